import sys

from llm_warden.proxy.cli import main

sys.exit(main())
