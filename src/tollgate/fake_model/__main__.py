"""``python -m tollgate.fake_model``: run the fake model server."""

from tollgate.fake_model.server import main

raise SystemExit(main())
