//! The session file survives `kill -9` mid-write (issue 19 item 2). A child process
//! (this test binary run again, on its ignored `session_writer_child` test) starts as a
//! registrar does (`SessionStore::recover`: sweep, then load), then saves new ids in a
//! loop until it is killed with SIGKILL at a random moment; 200 times. After every kill
//! the file holds the last id saved or the one being saved (never torn, empty or
//! missing), the next start reads it, and the temp file a killed save left is removed
//! by that start while files of other names in the config dir are left alone.
#![cfg(unix)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mcpctl_registrar::config::SessionStore;

/// Tells the child which config dir to write in; without it the child test refuses to run.
const WRITER_DIR: &str = "MCPCTL_SESSION_WRITER_DIR";
/// Reproduces a run: the seed it printed.
const SEED: &str = "MCPCTL_SESSION_KILL_SEED";
const KILLS: usize = 200;
/// The kill lands this long (at most) after the child has loaded the file: a save with
/// its fsync takes 0.1-2 ms here, so a kill lands before, inside and between saves.
const MAX_KILL_DELAY_MICROS: u64 = 4_000;
/// Bounds every wait on the child (its start, its exit).
const WAIT: Duration = Duration::from_secs(20);
/// The child stops by itself after this many saves, should its parent be gone.
const MAX_SAVES: u64 = 100_000;

/// The command that runs this test binary again: through cargo's runner for the target
/// when one is set (scripts/test-arm64.sh runs the tests under `timeout 600 qemu-aarch64
/// ...`, and cargo's environment reaches this process), else the binary itself. In a
/// process group of its own, so that the kill reaches the runner's children too.
fn writer_command() -> Command {
  use std::os::unix::process::CommandExt;
  let me = std::env::current_exe().unwrap();
  let runners: Vec<(String, String)> = std::env::vars()
    .filter(|(name, _)| name.starts_with("CARGO_TARGET_") && name.ends_with("_RUNNER"))
    .collect();
  let arch = std::env::consts::ARCH.to_uppercase();
  let runner = runners
    .iter()
    .find(|(name, _)| name.contains(&arch))
    .or(runners.first())
    .map(|(_, runner)| {
      runner
        .split_whitespace()
        .map(str::to_owned)
        .collect::<Vec<_>>()
    })
    .filter(|words| !words.is_empty());
  let mut command = match runner {
    Some(words) => {
      let mut command = Command::new(&words[0]);
      command.args(&words[1..]).arg(&me);
      command
    }
    None => Command::new(&me),
  };
  command.process_group(0);
  command
}

/// SIGKILL to the child's whole process group (the runner and what it runs).
fn kill_9(child: &std::process::Child) {
  let group = -(child.id() as libc::pid_t);
  // SAFETY: kill(2) with a process group this test made and has not reaped yet.
  assert_eq!(unsafe { libc::kill(group, libc::SIGKILL) }, 0, "kill -9");
}

/// The temp files a save writes through: `.provider-session-<12 alphanumerics>.tmp`
/// (src/config.rs). Checked here from the outside, so a change of the pattern that
/// the sweep does not follow fails this test.
fn is_save_temp_file(name: &str) -> bool {
  name
    .strip_prefix(".provider-session-")
    .and_then(|rest| rest.strip_suffix(".tmp"))
    .is_some_and(|random| random.len() == 12 && random.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn session_id(n: u64) -> String {
  format!("ps-{n}")
}

fn number_of(id: &str) -> u64 {
  id.strip_prefix("ps-")
    .and_then(|n| n.parse().ok())
    .unwrap_or_else(|| panic!("not an id this test wrote: {id:?}"))
}

/// The config dir's names, sorted.
fn names_in(dir: &Path) -> Vec<String> {
  let mut names: Vec<String> = std::fs::read_dir(dir)
    .unwrap()
    .map(|entry| entry.unwrap().file_name().into_string().unwrap())
    .collect();
  names.sort();
  names
}

/// xorshift64*: enough to spread the kills, and reproducible from the printed seed.
struct Spread(u64);

impl Spread {
  fn next(&mut self, below: u64) -> u64 {
    self.0 ^= self.0 >> 12;
    self.0 ^= self.0 << 25;
    self.0 ^= self.0 >> 27;
    self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % below
  }
}

/// The child: starts from the file as a registrar does, then saves ids one after the
/// other, saying on stdout (one write per line, unbuffered) before and after each save.
#[test]
#[ignore = "the child process of session_file_survives_kill_9_mid_write, which runs it"]
fn session_writer_child() {
  let dir = std::env::var_os(WRITER_DIR).expect("run by session_file_survives_kill_9_mid_write");
  let store = SessionStore::new(dir.into());
  let loaded = store
    .recover()
    .expect("the session file is readable at start")
    .expect("the session file exists at start");
  let mut out = std::io::stdout().lock();
  let mut say = |line: String| {
    out.write_all(line.as_bytes()).unwrap();
    out.flush().unwrap();
  };
  say(format!("loaded {loaded}\n"));
  let first = number_of(&loaded) + 1;
  for n in first..first + MAX_SAVES {
    say(format!("saving {n}\n"));
    store.save(&session_id(n)).expect("save");
    say(format!("saved {n}\n"));
  }
}

/// What the child said before it was killed.
#[derive(Default)]
struct Said {
  loaded: Option<String>,
  /// The last save begun, and whether it was said to be done.
  last_saving: Option<u64>,
  last_saved: Option<u64>,
}

#[test]
fn session_file_survives_kill_9_mid_write() {
  let temp = tempfile::tempdir().unwrap();
  let dir = temp.path().join("config");
  let store = SessionStore::new(dir.clone());
  store.save(&session_id(0)).unwrap();
  // Files the sweep must never touch: another program's temp files, the name the
  // registrar's older versions used, near misses of the pattern, a link and a
  // directory that have the pattern's exact shape.
  let foreign = [
    ".tmpAbC123",
    ".provider-session.4242.tmp",
    ".provider-session-short.tmp",
    ".provider-session-abcdefghijk!.tmp",
    "provider-session.bak",
    "credentials",
  ];
  for name in foreign {
    std::fs::write(dir.join(name), "not ours").unwrap();
  }
  let linked = ".provider-session-LinkLinkLink.tmp";
  std::os::unix::fs::symlink(dir.join("credentials"), dir.join(linked)).unwrap();
  let directory = ".provider-session-DirectoryDr.tmp";
  std::fs::create_dir(dir.join(directory)).unwrap();
  let mut expected_names: Vec<String> = foreign
    .iter()
    .chain([&linked, &directory, &"provider-session"])
    .map(|name| name.to_string())
    .collect();
  expected_names.sort();

  let seed = std::env::var(SEED)
    .ok()
    .and_then(|seed| seed.parse().ok())
    .unwrap_or_else(|| {
      std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1
    });
  eprintln!("{SEED}={seed}");
  let mut spread = Spread(seed);
  let started = Instant::now();
  let (mut in_a_save, mut saves, mut temp_left) = (0, 0, 0);
  let mut current = session_id(0);

  for kill in 0..KILLS {
    let mut child = writer_command()
      .args([
        "session_writer_child",
        "--exact",
        "--ignored",
        "--nocapture",
      ])
      .env(WRITER_DIR, &dir)
      .stdin(Stdio::null())
      .stdout(Stdio::piped())
      .stderr(Stdio::null())
      .spawn()
      .unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    // Read beside the child, so a full pipe never holds it still; ends at EOF, once
    // the killed child's end of the pipe is closed.
    let reader = std::thread::spawn(move || {
      for line in BufReader::new(stdout).lines() {
        if lines_tx.send(line.unwrap()).is_err() {
          break;
        }
      }
    });
    let mut said = Said::default();
    let absorb = |said: &mut Said, line: String| {
      if let Some(id) = line.strip_prefix("loaded ") {
        said.loaded = Some(id.to_owned());
      } else if let Some(n) = line.strip_prefix("saving ") {
        said.last_saving = Some(n.parse().unwrap());
      } else if let Some(n) = line.strip_prefix("saved ") {
        said.last_saved = Some(n.parse().unwrap());
      }
    };
    // The kill is timed from the child's start as a registrar, not from its spawn.
    let deadline = Instant::now() + WAIT;
    while said.loaded.is_none() {
      let left = deadline.saturating_duration_since(Instant::now());
      match lines.recv_timeout(left) {
        Ok(line) => absorb(&mut said, line),
        Err(_) => panic!("kill {kill}: the child did not start within {WAIT:?}"),
      }
    }
    std::thread::sleep(Duration::from_micros(spread.next(MAX_KILL_DELAY_MICROS)));
    kill_9(&child);
    child.wait().unwrap();
    reader.join().unwrap();
    for line in lines.try_iter() {
      absorb(&mut said, line);
    }

    // The child started from the file the previous round left.
    assert_eq!(
      said.loaded.as_deref(),
      Some(current.as_str()),
      "kill {kill}"
    );
    let leftovers: Vec<String> = names_in(&dir)
      .into_iter()
      .filter(|name| is_save_temp_file(name) && name != linked && name != directory)
      .collect();
    assert!(leftovers.len() <= 1, "kill {kill}: {leftovers:?}");
    temp_left += leftovers.len();

    // The next start: the sweep, then the id, exactly as Registrar::new does.
    let id = store
      .recover()
      .unwrap_or_else(|error| panic!("kill {kill}: the file is torn: {error}"))
      .unwrap_or_else(|| panic!("kill {kill}: the file is missing"));
    let n = number_of(&id);
    let before = number_of(&current);
    match (said.last_saving, said.last_saved) {
      // Killed before its first save: the file is the one it loaded.
      (None, _) => assert_eq!(n, before, "kill {kill}"),
      // Killed after a save, before the next began.
      (Some(saving), Some(saved)) if saving == saved => assert_eq!(n, saved, "kill {kill}"),
      // Killed inside a save: the old id or the new one, nothing else.
      (Some(saving), _) => {
        in_a_save += 1;
        assert!(
          n == saving || n == saving - 1,
          "kill {kill} in the save of {saving}: the file holds {n}"
        );
      }
    }
    saves += n - before;
    current = id;
    assert_eq!(
      names_in(&dir),
      expected_names,
      "kill {kill}: the sweep removed the temp file, and nothing else"
    );
  }
  eprintln!(
    "{KILLS} kills in {:.1} s: {in_a_save} inside a save, {temp_left} left a temp file (swept), \
     {saves} saves completed",
    started.elapsed().as_secs_f64()
  );
  // The test must have killed saves in the middle, or it showed nothing.
  assert!(in_a_save > 0, "no kill landed inside a save");
}
