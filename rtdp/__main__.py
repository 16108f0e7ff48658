from rtdp.cli import main

raise SystemExit(main())
