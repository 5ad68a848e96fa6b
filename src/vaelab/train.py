"""`python -m vaelab.train`: the command README has always given beside vaelab-train; the app is vaelab.cli.train."""

from vaelab.cli.train import main

if __name__ == "__main__":
    main()
