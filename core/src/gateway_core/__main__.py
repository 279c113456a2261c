"""`python -m gateway_core`: the same command line as `gateway`.

Owns nothing else; useful where the console script is not on PATH.
"""

from .cli import main

main()
