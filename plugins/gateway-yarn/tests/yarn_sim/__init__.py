"""A YARN simulator at skein's gRPC layer, for the gateway-yarn tests (no Hadoop here).

Owns nothing itself; `yarn_sim.server` holds the simulated driver and application masters.
"""
