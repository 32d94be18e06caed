//! Throughput of the SSE parser: `cargo bench --bench sse`. One large frame fed
//! in 1 KiB reads (the case that is quadratic in eventsource-stream), and a
//! stream of many small task events.

use std::time::{Duration, Instant};

use mcpctl_registrar::sse::{SseItem, SseParser, DEFAULT_MAX_FRAME_BYTES};

fn parse(stream: &[u8], read: usize) -> (usize, Duration) {
  let started = Instant::now();
  let mut parser = SseParser::new(DEFAULT_MAX_FRAME_BYTES);
  let mut items = Vec::new();
  let mut events = 0;
  for chunk in stream.chunks(read) {
    parser.feed(chunk, &mut items).expect("valid stream");
    events += items
      .iter()
      .filter(|item| matches!(item, SseItem::Event(_)))
      .count();
    items.clear();
  }
  (events, started.elapsed())
}

fn report(name: &str, stream: &[u8], read: usize) {
  let mut best = Duration::MAX;
  let mut events = 0;
  for _ in 0..5 {
    let (count, elapsed) = parse(stream, read);
    events = count;
    best = best.min(elapsed);
  }
  let mib = stream.len() as f64 / (1024.0 * 1024.0);
  println!(
    "{name:<40} {mib:>6.1} MiB {events:>7} events  best of 5: {:>8.2} ms  ({:.0} MiB/s)",
    best.as_secs_f64() * 1000.0,
    mib / best.as_secs_f64()
  );
}

fn main() {
  for mib in [1usize, 4, 8] {
    let mut frame = b"event: task\ndata: ".to_vec();
    frame.resize(frame.len() + mib * 1024 * 1024, b'x');
    frame.extend_from_slice(b"\n\n");
    report(&format!("one {mib} MiB frame in 1 KiB reads"), &frame, 1024);
  }
  let event = br#"event: task
id: 42
data: {"taskId":"t-42","provider":"local","stream":true,"body":{"model":"local","messages":[{"role":"user","content":"Say hello"}]}}

"#;
  let stream: Vec<u8> = event
    .iter()
    .copied()
    .cycle()
    .take(event.len() * 50_000)
    .collect();
  report("50,000 task events in 16 KiB reads", &stream, 16 * 1024);
  report("50,000 task events in 7-byte reads", &stream, 7);
}
