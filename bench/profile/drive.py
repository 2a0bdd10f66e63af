"""Sequential requests for the callgrind profile: MODE (metered|pass|bare) N KEY PORT [EVENTS].

One keep-alive connection; every fifth call streams. `pass` picks the
gateway's unmetered route by Host; `bare` (the bare hyper proxy) sends the
same requests as `metered`. With EVENTS, every call streams and the mock
sends EVENTS content deltas (at most 50: `max_tokens` with seed 40), 1 ms
apart so that each crosses the proxy on its own, as a model's tokens do;
two runs with different EVENTS give the cost of one event. Exits non-zero
unless every response is 200 and, with EVENTS, carries that many deltas.
"""
import http.client
import json
import sys

mode, n, key, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
events = int(sys.argv[5]) if len(sys.argv) > 5 else None
conn = http.client.HTTPConnection("127.0.0.1", port)
plain = json.dumps({"model": "gpt-4o-mini", "max_tokens": 40, "seed": 3,
                    "messages": [{"role": "user", "content": "hello there, how are you today?"}]})
stream = json.dumps({"model": "gpt-4o-mini", "max_tokens": 40, "stream": True,
                     "messages": [{"role": "user", "content": "hi"}]})
if events is not None:
    if not 1 <= events <= 50:
        sys.exit("EVENTS must be 1..50 (the mock sends min(max_tokens, 10 + seed % 41) deltas)")
    stream = json.dumps({"model": "gpt-4o-mini", "max_tokens": events, "seed": 40, "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})
statuses = {}
for i in range(n):
    headers = {"content-type": "application/json", "authorization": "Bearer " + key}
    if mode == "pass":
        headers["host"] = "passthrough.test"
    if events is not None:
        headers["x-mock-pace-ms"] = "1"
    streamed = events is not None or i % 5 == 4
    conn.request("POST", "/v1/chat/completions", stream if streamed else plain, headers)
    response = conn.getresponse()
    body = response.read()
    if events is not None and response.status == 200:
        deltas = body.count(b'"content":"tok "') + body.count(b'"content": "tok "')
        if deltas != events:
            sys.exit(f"{mode}: {deltas} content deltas in a stream, not {events}")
    statuses[response.status] = statuses.get(response.status, 0) + 1
if set(statuses) != {200}:
    sys.exit(f"{mode}: unexpected statuses {statuses}")
