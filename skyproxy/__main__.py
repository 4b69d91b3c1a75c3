from skyproxy.cli.main import main

raise SystemExit(main())
