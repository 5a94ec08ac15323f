from mrgd_ext.cli import main

raise SystemExit(main())
