from tollgate.cli import main

raise SystemExit(main())
