-- Prints wrk's summary as one JSON line (latencies in microseconds) for bench/harness.py.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %.0f, "duration_us": %.0f, "connect": %.0f, "read": %.0f, "write": %.0f, ' ..
    '"timeout": %.0f, "non2xx": %.0f, "p50": %.0f, "p90": %.0f, "p99": %.0f, "mean": %.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
