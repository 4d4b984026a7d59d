"""Run under the launcher on 2 ranks: rank 1 attacks the launcher's status port, then both succeed.

It knows the port (from its environment) but, like anyone else on the network, not a valid key
for what it sends: a failure of rank 0 signed with a key of its own, the same unsigned, and a real
signed report of its own with the exit code changed afterwards. None may count.
"""
import json
import os
import socket
import time

from launch.status_channel import ADDRESS_ENV, SECRET_ENV, encode, new_secret, parse_address, rank_from_env

rank = rank_from_env(os.environ)
if rank == 1:
    addresses, port = parse_address(os.environ[ADDRESS_ENV])
    lie = {"kind": "ended", "rank": 0, "host": "node1", "pid": 1, "exit_code": 9, "signal": None,
           "end_time": 0.0, "stderr_tail": ["forged"]}
    tampered = encode(os.environ[SECRET_ENV], {**lie, "exit_code": 0}).replace(b'"exit_code":0', b'"exit_code":9')
    with socket.create_connection((addresses[0], port), timeout=10) as s:
        s.sendall(encode(new_secret(), lie) + json.dumps(lie).encode() + b"\n" + tampered)
    print("forged 3 reports", flush=True)
time.sleep(1.0)  # both ranks still running while the launcher reads them
