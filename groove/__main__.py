from groove.cli import main

raise SystemExit(main())
