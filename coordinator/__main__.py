import sys

from coordinator.main import main

if __name__ == "__main__":
    sys.exit(main())
