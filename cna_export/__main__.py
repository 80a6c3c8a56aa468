from cna_export.cli.main import main

raise SystemExit(main())
