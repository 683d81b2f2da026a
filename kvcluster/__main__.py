from kvcluster.cli import main

raise SystemExit(main())
