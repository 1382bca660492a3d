from idlefleet.cli.main import main

raise SystemExit(main())
