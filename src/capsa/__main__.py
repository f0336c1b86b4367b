"""``python -m capsa``: the ``capsa`` command."""

from capsa.cli.main import main

raise SystemExit(main())
