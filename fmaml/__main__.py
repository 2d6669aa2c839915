import sys

from fmaml.cli import command_line

if __name__ == "__main__":
    sys.exit(command_line())
