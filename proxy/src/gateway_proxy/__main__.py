"""``python -m gateway_proxy``: the standalone proxy command.

Owns nothing but the call into `gateway_proxy.cli.main`.
"""

from .cli import main

main()
