import sys

from timm_ferkd.cli import main

if __name__ == '__main__':
    sys.exit(main())
