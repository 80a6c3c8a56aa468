from cna_export.cli import main

raise SystemExit(main())
