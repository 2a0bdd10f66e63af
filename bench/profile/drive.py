"""Sequential requests for the callgrind profile: MODE (metered|pass|bare) N KEY PORT.

One keep-alive connection; every fifth call streams. `pass` picks the
gateway's unmetered route by Host; `bare` (the bare hyper proxy) sends the
same requests as `metered`. Exits non-zero unless every response is 200.
"""
import http.client
import json
import sys

mode, n, key, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
conn = http.client.HTTPConnection("127.0.0.1", port)
plain = json.dumps({"model": "gpt-4o-mini", "max_tokens": 40, "seed": 3,
                    "messages": [{"role": "user", "content": "hello there, how are you today?"}]})
stream = json.dumps({"model": "gpt-4o-mini", "max_tokens": 40, "stream": True,
                     "messages": [{"role": "user", "content": "hi"}]})
statuses = {}
for i in range(n):
    headers = {"content-type": "application/json", "authorization": "Bearer " + key}
    if mode == "pass":
        headers["host"] = "passthrough.test"
    conn.request("POST", "/v1/chat/completions", stream if i % 5 == 4 else plain, headers)
    response = conn.getresponse()
    response.read()
    statuses[response.status] = statuses.get(response.status, 0) + 1
if set(statuses) != {200}:
    sys.exit(f"{mode}: unexpected statuses {statuses}")
