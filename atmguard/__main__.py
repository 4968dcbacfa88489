from atmguard.cli.main import main

raise SystemExit(main())
