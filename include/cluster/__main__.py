import sys

from include.cluster.manager import main

sys.exit(main())
