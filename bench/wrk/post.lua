-- wrk script for the benchmark suite: POST one OpenAI-style request body over and over.
--
--   wrk -t1 -c32 -d10s --latency -s bench/wrk/post.lua URL -- KEY MODEL STREAM [BODY_FILE] [HEADERS]
--
--   KEY        bearer key ("" or "-" for none)
--   MODEL      model name put into the built-in chat body (default bench-model)
--   STREAM     "1" adds "stream": true and stream_options.include_usage (default "0")
--   BODY_FILE  optional file whose content is sent instead of the built-in chat body ("" for none)
--   HEADERS    optional extra request headers, "Name: value" pairs separated by ";" (a peer
--              that routes by headers, such as the Portkey gateway, needs them)
--
-- At the end it prints exactly one line that starts with "BENCHJSON " followed by a JSON
-- object: latency percentiles in ms, req/s and the error counts. "non2xx" counts every
-- response whose status is outside 200-299 (wrk's own "status" counter only sees >= 400).

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

local function chat_body(model, stream)
  local extra = ""
  if stream == "1" then
    extra = '"stream":true,"stream_options":{"include_usage":true},'
  end
  return '{"model":"' .. model .. '",' .. extra ..
    '"max_tokens":64,"temperature":0.2,"user":"bench",' ..
    '"messages":[' ..
    '{"role":"system","content":"You are a helpful assistant. Answer briefly and precisely."},' ..
    '{"role":"user","content":"In one sentence, what does an AI gateway add between a client and a model provider?"}' ..
    ']}'
end

function init(args)
  local key = args[1] or ""
  local model = args[2] or "bench-model"
  local stream = args[3] or "0"
  local body_file = args[4] or ""
  local extra_headers = args[5] or ""

  local body
  if body_file ~= "" then
    local f = assert(io.open(body_file, "rb"))
    body = f:read("*a")
    f:close()
  else
    body = chat_body(model, stream)
  end

  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
  if stream == "1" then
    wrk.headers["Accept"] = "text/event-stream"
  end
  if key ~= "" and key ~= "-" then
    wrk.headers["Authorization"] = "Bearer " .. key
  end
  for pair in string.gmatch(extra_headers, "[^;]+") do
    local name, value = string.match(pair, "^%s*([^:]-)%s*:%s*(.-)%s*$")
    if name and name ~= "" then
      wrk.headers[name] = value
    end
  end
  non2xx = 0
  first_bad = 0
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    if first_bad == 0 then
      first_bad = status
    end
  end
end

function done(summary, latency, requests)
  local bad, bad_status = 0, 0
  for _, t in ipairs(threads) do
    bad = bad + (t:get("non2xx") or 0)
    local s = t:get("first_bad") or 0
    if bad_status == 0 and s ~= 0 then
      bad_status = s
    end
  end
  local e = summary.errors
  local secs = summary.duration / 1e6
  local sock = e.connect + e.read + e.write + e.timeout
  io.write(string.format(
    'BENCHJSON {"requests":%d,"seconds":%.3f,"rps":%.2f,' ..
    '"p50_ms":%.4f,"p90_ms":%.4f,"p99_ms":%.4f,"max_ms":%.3f,"mean_ms":%.4f,' ..
    '"non2xx":%d,"first_bad_status":%d,"socket_errors":%d,"timeouts":%d,' ..
    '"errors":%d,"bytes":%d}\n',
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, latency.mean / 1000,
    bad, bad_status, sock, e.timeout, bad + sock, summary.bytes))
end
