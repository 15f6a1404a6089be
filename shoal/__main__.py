import sys

from shoal.cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn imports it in a gateway process
    sys.exit(main())
