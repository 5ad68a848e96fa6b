"""`python -m vaelab.data [name] [root]`: make a data set available (what `make data` runs)."""

from vaelab.data.sources import main

main()
