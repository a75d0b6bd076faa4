-- wrk script: a mix of valid and invalid requests, re-read while keys rotate.
--
-- LOAD_TOKENS names a file of lines "<expected status>\t<Authorization value>"
-- (an empty value sends no header). Each thread re-reads it every 200
-- requests, so tokens signed by a rotated key reach the load within
-- milliseconds. The server echoes X-Expect; every answer is checked against
-- it, and done() prints one JSON line with the counts.

local tokens_file = os.getenv("LOAD_TOKENS")
local items = {}
local counter = 0
local threads = {}

-- per-thread counters (read by done() through thread:get)
responses = 0
mismatches = 0
valid_refused = 0
server_errors = 0
unmatched = 0

local function load()
  local f = io.open(tokens_file, "r")
  if f == nil then return end
  local list = {}
  for line in f:lines() do
    local expect, value = line:match("^(%d%d%d)\t(.*)$")
    if expect then list[#list + 1] = { expect, value } end
  end
  f:close()
  if #list > 0 then items = list end
end

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  load()
end

function request()
  counter = counter + 1
  if counter % 200 == 0 then load() end
  local item = items[(counter % #items) + 1]
  local headers = { ["X-Expect"] = item[1] }
  if item[2] ~= "" then headers["Authorization"] = item[2] end
  return wrk.format("GET", "/api/protected", headers)
end

function response(status, headers, body)
  responses = responses + 1
  if status >= 500 then server_errors = server_errors + 1 end
  local expect = headers["X-Expect"]
  if expect == nil then
    unmatched = unmatched + 1
    return
  end
  if tonumber(expect) ~= status then
    mismatches = mismatches + 1
    if expect == "200" then valid_refused = valid_refused + 1 end
  end
end

function done(summary, latency, requests)
  local totals = { responses = 0, mismatches = 0, valid_refused = 0, server_errors = 0, unmatched = 0 }
  for _, thread in ipairs(threads) do
    for name, _ in pairs(totals) do
      totals[name] = totals[name] + (thread:get(name) or 0)
    end
  end
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "socket_errors": %d, "non_2xx": %d, ' ..
    '"responses": %d, "mismatches": %d, "valid_refused": %d, "server_errors": %d, ' ..
    '"unmatched": %d, "latency_p50_us": %d, "latency_p99_us": %d, "latency_max_us": %d}\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, totals.responses, totals.mismatches, totals.valid_refused,
    totals.server_errors, totals.unmatched, latency:percentile(50), latency:percentile(99),
    latency.max))
end
