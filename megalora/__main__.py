from megalora.cli import main

raise SystemExit(main())
