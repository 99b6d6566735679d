from gaudi_pretrain.cli import main

raise SystemExit(main())
