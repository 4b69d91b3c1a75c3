from skyproxy.cli import main

raise SystemExit(main())
