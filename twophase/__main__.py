import sys

from twophase.cli import main

sys.exit(main())
