//! The CPU of one result POST on the client's side, without the rest of a task:
//! `cargo bench --bench post`. Three clients POST the same result body to a
//! loopback server (its own threads, std and httparse: not measured), 64 in
//! flight and one at a time, on one current-thread runtime whose thread's CPU
//! time is the figure:
//! - `registrar`: `McpdClient::post_result`, the registrar's own path (reqwest,
//!   the endpoint URL checked, the common headers, a timeout, the answer read);
//! - `hyper-util`: hyper-util's pooled client (the one reqwest wraps), the same
//!   headers and a timeout: what the path would cost on it;
//! - `hyper conn`: one hyper HTTP/1 connection per in-flight POST, driven by its
//!   own task: the floor of an HTTP/1 POST through hyper.
//!
//! docs/benchmark.md ("The HTTP client's share") has the figures.

#[cfg(target_os = "linux")]
mod linux {
  use std::io::{Read, Write};
  use std::net::{TcpListener, TcpStream};
  use std::time::Duration;

  use bytes::Bytes;
  use http_body_util::{BodyExt, Full};
  use mcpctl_registrar::mcpd::McpdClient;
  use mcpctl_registrar::secret::Secret;
  use serde_json::value::RawValue;

  /// POSTs per client, per concurrency, per round.
  const POSTS: usize = 20_000;
  const ROUNDS: usize = 3;
  /// A small `chat.completion`, as the registrar posts it.
  const RESULT: &str = r#"{"choices":[{"finish_reason":"stop","index":0,"logprobs":null,"message":{"content":"hello there","role":"assistant"}}],"created":1700000000,"id":"chatcmpl-b1","model":"bench","object":"chat.completion","usage":{"completion_tokens":2,"prompt_tokens":3,"total_tokens":5}}"#;
  const TIMEOUT: Duration = Duration::from_secs(30);

  /// This thread's CPU time in µs.
  fn thread_cpu_us() -> f64 {
    let mut now = libc::timespec {
      tv_sec: 0,
      tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as f64 * 1e6 + now.tv_nsec as f64 / 1e3
  }

  /// Answers every request on a connection with a 200 and a small JSON body,
  /// until the client closes it.
  fn answer(mut stream: TcpStream) {
    stream.set_nodelay(true).ok();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut filled = 0;
    loop {
      let (head, body) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = request.parse(&buffer[..filled]) {
          let length = request
            .headers
            .iter()
            .find(|header| header.name.eq_ignore_ascii_case("content-length"))
            .and_then(|header| std::str::from_utf8(header.value).ok()?.parse().ok())
            .unwrap_or(0);
          break (head, length);
        }
        match stream.read(&mut buffer[filled..]) {
          Ok(0) | Err(_) => return,
          Ok(read) => filled += read,
        }
      };
      while filled < head + body {
        match stream.read(&mut buffer[filled..]) {
          Ok(0) | Err(_) => return,
          Ok(read) => filled += read,
        }
      }
      buffer.copy_within(head + body..filled, 0);
      filled -= head + body;
      let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
      if stream.write_all(answer).is_err() {
        return;
      }
    }
  }

  /// The loopback server's port; it lives as long as the process.
  fn serve() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let port = listener.local_addr().expect("its address").port();
    std::thread::spawn(move || {
      for stream in listener.incoming().flatten() {
        std::thread::spawn(move || answer(stream));
      }
    });
    port
  }

  fn task_path(worker: usize, post: usize) -> String {
    format!("/api/v1/llms/_provider-tasks/b{worker}-{post}/result")
  }

  async fn registrar(port: u16, in_flight: usize) {
    let client = std::sync::Arc::new(
      McpdClient::new(
        &format!("http://127.0.0.1:{port}"),
        Secret::new("bench-token"),
        false,
      )
      .expect("a client"),
    );
    let result: Box<RawValue> = RawValue::from_string(RESULT.to_owned()).expect("JSON");
    let result = std::sync::Arc::new(result);
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..in_flight {
      let client = std::sync::Arc::clone(&client);
      let result = std::sync::Arc::clone(&result);
      workers.spawn(async move {
        for post in 0..POSTS / in_flight {
          let id = format!("b{worker}-{post}");
          let posted = client.post_result(&id, 200, &**result).await;
          assert!(posted.is_ok(), "the POST failed: {:?}", posted.err());
        }
      });
    }
    while workers.join_next().await.is_some() {}
  }

  /// The result POST's body as the registrar sends it.
  fn body() -> Bytes {
    Bytes::from(format!(r#"{{"status":200,"body":{RESULT}}}"#))
  }

  /// Waits (within the timeout) for a 2xx answer and reads its body.
  async fn answered<E: std::fmt::Debug>(
    response: impl std::future::Future<Output = Result<hyper::Response<hyper::body::Incoming>, E>>,
  ) {
    let response = tokio::time::timeout(TIMEOUT, response)
      .await
      .expect("in time")
      .expect("an answer");
    assert!(response.status().is_success());
    response.into_body().collect().await.expect("its body");
  }

  async fn hyper_util_client(port: u16, in_flight: usize) {
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
      hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let body = body();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..in_flight {
      let client = client.clone();
      let body = body.clone();
      workers.spawn(async move {
        for post in 0..POSTS / in_flight {
          let request = hyper::Request::post(format!(
            "http://127.0.0.1:{port}{}",
            task_path(worker, post)
          ))
          .header("authorization", "Bearer bench-token")
          .header("content-type", "application/json")
          .header("user-agent", "mcpctl-registrar/bench")
          .body(Full::new(body.clone()))
          .expect("a request");
          answered(client.request(request)).await;
        }
      });
    }
    while workers.join_next().await.is_some() {}
  }

  async fn hyper_conn(port: u16, in_flight: usize) {
    let body = body();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..in_flight {
      let body = body.clone();
      workers.spawn(async move {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
          .await
          .expect("a connection");
        let (mut sender, connection) =
          hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("a handshake");
        tokio::spawn(connection);
        for post in 0..POSTS / in_flight {
          let request = hyper::Request::post(task_path(worker, post))
            .header("host", format!("127.0.0.1:{port}"))
            .header("authorization", "Bearer bench-token")
            .header("content-type", "application/json")
            .header("user-agent", "mcpctl-registrar/bench")
            .body(Full::new(body.clone()))
            .expect("a request");
          sender.ready().await.expect("ready");
          answered(sender.send_request(request)).await;
        }
      });
    }
    while workers.join_next().await.is_some() {}
  }

  pub fn main() {
    let port = serve();
    let runtime = tokio::runtime::Builder::new_current_thread()
      .enable_all()
      .build()
      .expect("a runtime");
    for in_flight in [64, 1] {
      let mut figures: Vec<(&str, Vec<f64>)> = vec![
        ("registrar", Vec::new()),
        ("hyper-util", Vec::new()),
        ("hyper conn", Vec::new()),
      ];
      // Interleaved rounds, so that load from elsewhere lands on every client.
      for _ in 0..ROUNDS {
        for (name, samples) in &mut figures {
          let started = thread_cpu_us();
          runtime.block_on(async {
            match *name {
              "registrar" => registrar(port, in_flight).await,
              "hyper-util" => hyper_util_client(port, in_flight).await,
              _ => hyper_conn(port, in_flight).await,
            }
          });
          samples.push((thread_cpu_us() - started) / POSTS as f64);
        }
      }
      for (name, samples) in &mut figures {
        samples.sort_by(f64::total_cmp);
        println!(
          "{in_flight} in flight, {name}: {:.1} µs CPU per POST (median of {ROUNDS}; {:.1}–{:.1})",
          samples[ROUNDS / 2],
          samples[0],
          samples[ROUNDS - 1]
        );
      }
    }
  }
}

fn main() {
  #[cfg(target_os = "linux")]
  linux::main();
  #[cfg(not(target_os = "linux"))]
  println!("post: the thread CPU clock this bench reads is Linux's");
}
