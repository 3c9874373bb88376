-- wrk script: bench/call.lua's tools/call, and every answer is checked: a
-- JSON-RPC error (or a body without a result) counts as a failed call.
-- Used for the run during manifest reloads, where no call may fail.
-- (wrk runs from the repository root: see bench/load.sh.)
dofile("bench/call.lua")

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

failed = 0
function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"result"', 1, true) or string.find(body, '"error"', 1, true) then
    failed = failed + 1
  end
end

done = function(summary, latency, requests)
  local f = 0
  for _, t in ipairs(threads) do
    f = f + t:get("failed")
  end
  io.write(string.format("BENCH rps=%.1f p50_us=%d p99_us=%d requests=%d non_200=%d failed=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50), latency:percentile(99),
    summary.requests, summary.errors.status, f))
end
