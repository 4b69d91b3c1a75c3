-- wrk script: POST a prediction as JSON, as an app behind skyproxy would.
--
-- Each connection cycles through BENCH_USERS end users (X-User-Id bench-user-0..N-1;
-- default 100), so the per-user limiter sees many buckets, not one hot key. The requests
-- are formatted once in init(), so the per-request Lua cost is a table lookup.
--
-- done() prints one line "BENCH_JSON {...}" with requests, errors and latency
-- percentiles in microseconds; bench/run.py parses it.

local body = '{"model":"truefusion-pro","input":{"prompt":"test"}}'
local path = os.getenv("BENCH_PATH") or "/v1/predictions"
local users = tonumber(os.getenv("BENCH_USERS") or "100")
local token = os.getenv("BENCH_TOKEN")  -- a client token, for the tokens + budgets target

local requests = {}
local n = 0

function init(args)
  local thread_offset = math.random(0, users - 1)
  for i = 0, users - 1 do
    local user = (i + thread_offset) % users
    local headers = {
      ["Content-Type"] = "application/json",
      ["Accept"] = "application/json",
      ["X-User-Id"] = "bench-user-" .. user,
    }
    if token then
      headers["x-api-key"] = token
    end
    requests[i + 1] = wrk.format("POST", path, headers, body)
  end
end

function request()
  n = n % users + 1
  return requests[n]
end

function done(summary, latency, _)
  local e = summary.errors
  local parts = {
    string.format('"requests":%d', summary.requests),
    string.format('"duration_us":%d', summary.duration),
    string.format('"bytes":%d', summary.bytes),
    string.format(
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
      e.connect, e.read, e.write, e.status, e.timeout
    ),
    string.format('"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,'
      .. '"p50":%d,"p90":%d,"p99":%d,"p999":%d}',
      latency.min, latency.mean, latency.stdev, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9)),
  }
  io.write("BENCH_JSON {" .. table.concat(parts, ",") .. "}\n")
end
