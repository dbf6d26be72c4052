-- The streamed chat completion of chat_stream.lua, from a client that asks for usage itself
-- (`stream_options.include_usage`): what Tollgate relays as it comes, with nothing to add or
-- hide. bench/ab.py --stream-usage compares it with chat_stream.lua on the same upstream.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Api-Key"] = os.getenv("BENCH_API_KEY") or "bench-key-0123456789abcdef"
wrk.body = '{"model":"bench-model","messages":[{"role":"user","content":"Say hello"}],'
  .. '"stream":true,"stream_options":{"include_usage":true}}'

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")
