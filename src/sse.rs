//! Incremental parser for mcpd's control channel: the WHATWG server-sent events
//! wire, fed bytes as they arrive, in linear time and bounded memory.

use std::fmt;

/// The default frame limit the registrar uses: 16 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// A line buffer that grew past this is given back to the allocator once its
/// line is done, so one huge frame does not pin its memory for the session.
const KEPT_LINE_CAPACITY: usize = 64 * 1024;

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// One dispatched server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
  /// The `event:` field, or "message" when absent/empty.
  pub event: String,
  /// The `data:` lines joined by "\n" (no trailing newline).
  pub data: String,
  /// The last event ID in force when this event was dispatched (WHATWG "last
  /// event ID buffer"), None if never set.
  pub id: Option<String>,
}

/// What the parser produced from the bytes fed so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseItem {
  Event(SseEvent),
  /// A valid `retry:` field (ASCII digits only), in milliseconds.
  Retry(u64),
  /// A comment line (`: ...`), i.e. a keep-alive. The text is not kept.
  Comment,
}

/// Why the stream cannot be read any further.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseError {
  /// A line was not valid UTF-8; `offset` is the byte offset in the stream
  /// where that line starts.
  InvalidUtf8 { offset: u64 },
  /// The event being assembled (its data so far plus the current unfinished
  /// line) exceeded the limit.
  FrameTooLarge { limit: usize },
}

impl fmt::Display for SseError {
  fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match self {
      Self::InvalidUtf8 { offset } => write!(
        f,
        "event stream line starting at byte {offset} is not valid UTF-8"
      ),
      Self::FrameTooLarge { limit } => {
        write!(
          f,
          "event stream frame is larger than the {limit}-byte limit"
        )
      }
    }
  }
}

impl std::error::Error for SseError {}

/// Where the parser is in skipping a byte order mark at the start of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BomState {
  /// This many leading bytes of the stream matched the BOM so far; they are
  /// held back until the match is decided.
  Pending(usize),
  Done,
}

/// Turns a byte stream, split anywhere, into [`SseItem`]s.
///
/// Every byte is looked at a bounded number of times (once to find line ends,
/// once to validate UTF-8), whatever the split; an unfinished line is kept and
/// only the new bytes are scanned on the next feed.
pub struct SseParser {
  max_frame_bytes: usize,
  /// The unfinished line, without its terminator; holds no line end.
  line: Vec<u8>,
  /// Bytes of the complete non-comment lines of the event being assembled.
  frame_bytes: usize,
  data: String,
  event_type: String,
  last_event_id: Option<String>,
  /// The last event ID buffer as of the last dispatch (WHATWG's "last event ID
  /// string" of the event source): what a reconnect sends as Last-Event-ID.
  dispatched_id: Option<String>,
  /// The previous line ended with `\r`, so a `\n` next is part of that end.
  skip_lf: bool,
  bom: BomState,
  /// Stream bytes consumed so far (BOM included), for error offsets.
  offset: u64,
  line_start: u64,
  poisoned: Option<SseError>,
  /// Bytes examined, for the linear-time tests.
  #[cfg(test)]
  scanned: u64,
}

impl SseParser {
  /// `max_frame_bytes`: the most bytes one event (all its lines, including
  /// field names) may take before `FrameTooLarge`.
  ///
  /// Line terminators are not counted, and comment lines count only while
  /// they are unfinished, so keep-alives between events never add up.
  #[must_use]
  pub fn new(max_frame_bytes: usize) -> Self {
    Self {
      max_frame_bytes,
      line: Vec::new(),
      frame_bytes: 0,
      data: String::new(),
      event_type: String::new(),
      last_event_id: None,
      dispatched_id: None,
      skip_lf: false,
      bom: BomState::Pending(0),
      offset: 0,
      line_start: 0,
      poisoned: None,
      #[cfg(test)]
      scanned: 0,
    }
  }

  /// Feeds the next bytes of the stream (split anywhere, including inside a
  /// UTF-8 sequence or between \r and \n) and appends every complete item to
  /// `out`, in order. After an Err, the parser is poisoned: further feeds
  /// return the same error.
  ///
  /// # Errors
  ///
  /// [`SseError::InvalidUtf8`] for a line that is not UTF-8, and
  /// [`SseError::FrameTooLarge`] for an event over the limit. The items
  /// completed before the faulty line are still appended.
  pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<SseItem>) -> Result<(), SseError> {
    if let Some(error) = &self.poisoned {
      return Err(error.clone());
    }
    let result = self.feed_stream(bytes, out);
    if let Err(error) = &result {
      self.poisoned = Some(error.clone());
      // Nothing more will be parsed: give the buffers back.
      self.line = Vec::new();
      self.data = String::new();
      self.event_type = String::new();
    }
    result
  }

  /// A parser for a new connection of the same event source: the last event
  /// ID carries over, as WHATWG says it does across reconnects.
  #[must_use]
  pub fn resuming(max_frame_bytes: usize, last_event_id: Option<String>) -> Self {
    Self {
      dispatched_id: last_event_id.clone(),
      last_event_id,
      ..Self::new(max_frame_bytes)
    }
  }

  /// The last event ID buffer (persists across events, as WHATWG says),
  /// including an `id:` of an event not yet complete.
  #[must_use]
  pub fn last_event_id(&self) -> Option<&str> {
    self.last_event_id.as_deref()
  }

  /// The last event ID as of the last blank line, whether or not that frame
  /// had data: what to send as Last-Event-ID on reconnect.
  #[must_use]
  pub fn dispatched_event_id(&self) -> Option<&str> {
    self.dispatched_id.as_deref()
  }

  fn feed_stream(&mut self, bytes: &[u8], out: &mut Vec<SseItem>) -> Result<(), SseError> {
    let BomState::Pending(held) = self.bom else {
      return self.feed_lines(bytes, out);
    };
    let mut matched = held;
    let mut used = 0;
    for (&byte, &expected) in bytes.iter().zip(&BOM[held..]) {
      if byte != expected {
        break;
      }
      matched += 1;
      used += 1;
    }
    if matched == BOM.len() {
      self.bom = BomState::Done;
      self.offset = BOM.len() as u64;
      self.line_start = self.offset;
      return self.feed_lines(&bytes[used..], out);
    }
    if used == bytes.len() {
      // Still a BOM prefix: wait for more bytes to decide.
      self.bom = BomState::Pending(matched);
      return Ok(());
    }
    // Not a BOM after all: the held bytes are ordinary stream content.
    self.bom = BomState::Done;
    self.feed_lines(&BOM[..matched], out)?;
    self.feed_lines(&bytes[used..], out)
  }

  fn feed_lines(&mut self, bytes: &[u8], out: &mut Vec<SseItem>) -> Result<(), SseError> {
    let mut rest = bytes;
    while let Some((&first, after_first)) = rest.split_first() {
      if self.skip_lf {
        self.skip_lf = false;
        if first == b'\n' {
          rest = after_first;
          self.offset += 1;
          self.line_start = self.offset;
          continue;
        }
      }
      let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
        // An unfinished line: keep it, never to be scanned for line ends again.
        self.count_scanned(rest.len());
        self.buffer_line_part(rest)?;
        self.offset += rest.len() as u64;
        return Ok(());
      };
      self.count_scanned(end + 1);
      let (head, terminator_and_tail) = rest.split_at(end);
      let Some((&terminator, tail)) = terminator_and_tail.split_first() else {
        return Ok(());
      };
      if self.line.is_empty() {
        self.process_line(head, out)?;
      } else {
        self.buffer_line_part(head)?;
        let mut line = std::mem::take(&mut self.line);
        self.process_line(&line, out)?;
        line.clear();
        line.shrink_to(KEPT_LINE_CAPACITY);
        self.line = line;
      }
      self.offset += end as u64 + 1;
      self.line_start = self.offset;
      self.skip_lf = terminator == b'\r';
      rest = tail;
    }
    Ok(())
  }

  /// Appends to the unfinished line, refusing to hold more than the frame limit.
  fn buffer_line_part(&mut self, part: &[u8]) -> Result<(), SseError> {
    self.check_frame(self.line.len().saturating_add(part.len()))?;
    self.line.extend_from_slice(part);
    Ok(())
  }

  /// The event's size if a line of `line_len` bytes joined it, or the error
  /// if that is over the limit.
  fn check_frame(&self, line_len: usize) -> Result<usize, SseError> {
    let total = self.frame_bytes.saturating_add(line_len);
    if total > self.max_frame_bytes {
      return Err(SseError::FrameTooLarge {
        limit: self.max_frame_bytes,
      });
    }
    Ok(total)
  }

  fn process_line(&mut self, line: &[u8], out: &mut Vec<SseItem>) -> Result<(), SseError> {
    // Size first, then UTF-8, so the outcome does not depend on where the
    // stream was split (an unfinished line is only ever size-checked).
    let frame_bytes = self.check_frame(line.len())?;
    self.count_scanned(line.len());
    let line = std::str::from_utf8(line).map_err(|_| SseError::InvalidUtf8 {
      offset: self.line_start,
    })?;
    if line.is_empty() {
      self.dispatch(out);
      return Ok(());
    }
    if line.starts_with(':') {
      out.push(SseItem::Comment);
      return Ok(());
    }
    self.frame_bytes = frame_bytes;
    let (name, value) = match line.split_once(':') {
      Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
      None => (line, ""),
    };
    match name {
      "event" => value.clone_into(&mut self.event_type),
      "data" => {
        self.data.push_str(value);
        self.data.push('\n');
      }
      "id" if !value.contains('\0') => {
        self.last_event_id = if value.is_empty() {
          None
        } else {
          Some(value.to_owned())
        };
      }
      "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
        out.push(SseItem::Retry(parse_retry(value)));
      }
      _ => {}
    }
    Ok(())
  }

  fn dispatch(&mut self, out: &mut Vec<SseItem>) {
    self.frame_bytes = 0;
    // WHATWG sets the source's last event ID before it drops a frame without data.
    self.dispatched_id.clone_from(&self.last_event_id);
    let event_type = std::mem::take(&mut self.event_type);
    if self.data.is_empty() {
      return;
    }
    let mut data = std::mem::take(&mut self.data);
    if data.ends_with('\n') {
      data.pop();
    }
    let event = if event_type.is_empty() {
      "message".to_owned()
    } else {
      event_type
    };
    out.push(SseItem::Event(SseEvent {
      event,
      data,
      id: self.last_event_id.clone(),
    }));
  }

  #[inline]
  fn count_scanned(&mut self, bytes: usize) {
    #[cfg(test)]
    {
      self.scanned += bytes as u64;
    }
    #[cfg(not(test))]
    let _ = bytes;
  }
}

/// ASCII digits to milliseconds; a value too large for u64 saturates.
fn parse_retry(digits: &str) -> u64 {
  digits.bytes().fold(0u64, |ms, digit| {
    ms.saturating_mul(10)
      .saturating_add(u64::from(digit - b'0'))
  })
}

#[cfg(test)]
mod tests {
  use super::*;

  const KIB: usize = 1024;

  fn event(event: &str, data: &str, id: Option<&str>) -> SseItem {
    SseItem::Event(SseEvent {
      event: event.to_owned(),
      data: data.to_owned(),
      id: id.map(str::to_owned),
    })
  }

  /// Feeds `input` cut at each of `cuts` (ascending offsets); collects the
  /// items up to the end or the first error.
  fn parse_split(
    input: &[u8],
    cuts: &[usize],
    limit: usize,
  ) -> (Vec<SseItem>, Result<(), SseError>, SseParser) {
    let mut parser = SseParser::new(limit);
    let mut items = Vec::new();
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
      if let Err(error) = parser.feed(&input[start..cut], &mut items) {
        return (items, Err(error), parser);
      }
      start = cut;
    }
    (items, Ok(()), parser)
  }

  fn parse(input: &[u8]) -> Vec<SseItem> {
    let (items, result, _) = parse_split(input, &[], DEFAULT_MAX_FRAME_BYTES);
    assert_eq!(result, Ok(()));
    items
  }

  const FIXTURE: &str = concat!(
    "\u{FEFF}: hello, keep-alive\r\n",
    "retry: 2500\n",
    "event: task\r\n",
    "id: 1\r",
    "data: {\"taskId\":\"t-1\"}\n",
    "data: second line é😀\r\n",
    "\r\n",
    "data\n",
    "\n",
    "event: ping\n",
    "data:no-space\r",
    ": comment\r",
    "\r",
    "id\n",
    "data: after reset\n",
    "\n",
    "retry: 12x\n",
    "retry:\n",
    "foo: bar\n",
    "event: cancel\n",
    "id: 7😀\n",
    "data:  two spaces\n",
    "data: a: b\r\n",
    "data\r\n",
    "\r\n",
    "event: orphan\n",
    "\n",
    "event:\n",
    "data: é\n",
    "\n",
    "retry: 99999999999999999999999\r\n",
    "data: never dispatched é",
  );

  fn fixture_items() -> Vec<SseItem> {
    vec![
      SseItem::Comment,
      SseItem::Retry(2500),
      event("task", "{\"taskId\":\"t-1\"}\nsecond line é😀", Some("1")),
      event("message", "", Some("1")),
      SseItem::Comment,
      event("ping", "no-space", Some("1")),
      event("message", "after reset", None),
      event("cancel", " two spaces\na: b\n", Some("7😀")),
      event("message", "é", Some("7😀")),
      SseItem::Retry(u64::MAX),
    ]
  }

  #[test]
  fn fixture_parsed_whole() {
    let (items, result, parser) = parse_split(FIXTURE.as_bytes(), &[], DEFAULT_MAX_FRAME_BYTES);
    assert_eq!(result, Ok(()));
    assert_eq!(items, fixture_items());
    assert_eq!(parser.last_event_id(), Some("7😀"));
    assert_eq!(parser.line, "data: never dispatched é".as_bytes());
  }

  #[test]
  fn fixture_split_at_every_offset_in_two() {
    let input = FIXTURE.as_bytes();
    let expected = fixture_items();
    for cut in 0..=input.len() {
      let (items, result, parser) = parse_split(input, &[cut], DEFAULT_MAX_FRAME_BYTES);
      assert_eq!(result, Ok(()), "cut at {cut}");
      assert_eq!(items, expected, "cut at {cut}");
      assert_eq!(parser.last_event_id(), Some("7😀"), "cut at {cut}");
    }
  }

  #[test]
  fn fixture_split_at_every_pair_of_offsets() {
    let input = FIXTURE.as_bytes();
    let expected = fixture_items();
    for first in 0..=input.len() {
      for second in first..=input.len() {
        let (items, result, _) = parse_split(input, &[first, second], DEFAULT_MAX_FRAME_BYTES);
        assert_eq!(result, Ok(()), "cuts at {first}, {second}");
        assert_eq!(items, expected, "cuts at {first}, {second}");
      }
    }
  }

  #[test]
  fn fixture_fed_byte_by_byte() {
    let input = FIXTURE.as_bytes();
    let cuts: Vec<usize> = (1..input.len()).collect();
    let (items, result, parser) = parse_split(input, &cuts, DEFAULT_MAX_FRAME_BYTES);
    assert_eq!(result, Ok(()));
    assert_eq!(items, fixture_items());
    assert_eq!(parser.last_event_id(), Some("7😀"));
  }

  #[test]
  fn empty_feeds_change_nothing() {
    let mut parser = SseParser::new(KIB);
    let mut items = Vec::new();
    for chunk in [&b"data: a\r"[..], b"", b"", b"\n", b"", b"\r\n"] {
      parser.feed(chunk, &mut items).unwrap();
    }
    assert_eq!(items, vec![event("message", "a", None)]);
  }

  #[test]
  fn bom_is_skipped_only_at_the_very_start() {
    assert_eq!(
      parse(b"\xEF\xBB\xBFdata: a\n\n"),
      vec![event("message", "a", None)]
    );
    // A BOM later in the stream is content: here, part of a field name.
    assert_eq!(
      parse(b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"),
      vec![event("message", "a", None)]
    );
    // Only one BOM is skipped.
    assert_eq!(parse(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: a\n\n"), vec![]);
    // A BOM prefix that turns out not to be one is stream content (invalid here).
    let (items, result, _) = parse_split(b"\xEF\xBBdata: a\n\n", &[1], KIB);
    assert_eq!(items, vec![]);
    assert_eq!(result, Err(SseError::InvalidUtf8 { offset: 0 }));
    // Fewer bytes than a BOM, then a line.
    assert_eq!(parse(b"\n"), vec![]);
    assert_eq!(parse(b":\n"), vec![SseItem::Comment]);
  }

  #[test]
  fn crlf_split_across_feeds_is_one_line_end() {
    let (items, result, _) = parse_split(b"data: a\r\n\r\ndata: b\r\n\r\n", &[8, 10, 19], KIB);
    assert_eq!(result, Ok(()));
    assert_eq!(
      items,
      vec![event("message", "a", None), event("message", "b", None)]
    );
    // `\r` then `\r`: two line ends, so the second is a blank line.
    assert_eq!(
      parse(b"data: a\r\rdata: b\n\n"),
      vec![event("message", "a", None), event("message", "b", None)]
    );
    // `\n` then `\r`: two line ends as well.
    assert_eq!(
      parse(b"data: a\n\rdata: b\n\n"),
      vec![event("message", "a", None), event("message", "b", None)]
    );
  }

  #[test]
  fn id_persists_across_events() {
    let mut parser = SseParser::new(KIB);
    let mut items = Vec::new();
    parser
      .feed(b"id: a\ndata: 1\n\ndata: 2\n\n", &mut items)
      .unwrap();
    assert_eq!(parser.last_event_id(), Some("a"));
    // An id on an event without data still sets the buffer.
    parser.feed(b"id: b\n\ndata: 3\n\n", &mut items).unwrap();
    assert_eq!(
      items,
      vec![
        event("message", "1", Some("a")),
        event("message", "2", Some("a")),
        event("message", "3", Some("b")),
      ]
    );
    assert_eq!(parser.last_event_id(), Some("b"));
  }

  #[test]
  fn id_with_nul_is_ignored() {
    let mut parser = SseParser::new(KIB);
    let mut items = Vec::new();
    parser
      .feed(
        b"id: good\n\nid: b\0d\ndata: x\n\nid: \0\ndata: y\n\n",
        &mut items,
      )
      .unwrap();
    assert_eq!(
      items,
      vec![
        event("message", "x", Some("good")),
        event("message", "y", Some("good"))
      ]
    );
    assert_eq!(parser.last_event_id(), Some("good"));
  }

  #[test]
  fn empty_id_resets() {
    for reset in [&b"id\n"[..], b"id:\n", b"id: \n"] {
      let mut parser = SseParser::new(KIB);
      let mut items = Vec::new();
      parser.feed(b"id: 5\ndata: x\n\n", &mut items).unwrap();
      assert_eq!(parser.last_event_id(), Some("5"));
      parser.feed(reset, &mut items).unwrap();
      parser.feed(b"data: y\n\n", &mut items).unwrap();
      assert_eq!(parser.last_event_id(), None);
      assert_eq!(
        items,
        vec![
          event("message", "x", Some("5")),
          event("message", "y", None)
        ]
      );
    }
  }

  #[test]
  fn id_keeps_spaces_after_the_first_and_colons() {
    let mut parser = SseParser::new(KIB);
    let mut items = Vec::new();
    parser.feed(b"id:  a:b \n", &mut items).unwrap();
    assert_eq!(parser.last_event_id(), Some(" a:b "));
  }

  #[test]
  fn retry_accepts_only_ascii_digits() {
    let items = parse(b"retry: 0\nretry:15\nretry: 1.5\nretry: -1\nretry:  7\nretry: \xd9\xa3\nretry: 18446744073709551615\nretry: 18446744073709551616\n");
    assert_eq!(
      items,
      vec![
        SseItem::Retry(0),
        SseItem::Retry(15),
        SseItem::Retry(u64::MAX),
        SseItem::Retry(u64::MAX),
      ]
    );
  }

  #[test]
  fn event_type_resets_after_each_blank_line() {
    assert_eq!(
      parse(b"event: a\n\ndata: 1\n\nevent: b\ndata: 2\n\ndata: 3\n\n"),
      vec![
        event("message", "1", None),
        event("b", "2", None),
        event("message", "3", None)
      ]
    );
  }

  #[test]
  fn eight_mib_line_in_one_kib_reads_is_linear() {
    const SIZE: usize = 8 * KIB * KIB;
    let mut input = b"event: task\ndata: ".to_vec();
    input.resize(input.len() + SIZE, b'x');
    input.extend_from_slice(b"\n\n");
    let mut parser = SseParser::new(DEFAULT_MAX_FRAME_BYTES);
    let mut items = Vec::new();
    for chunk in input.chunks(KIB) {
      parser.feed(chunk, &mut items).unwrap();
    }
    assert_eq!(items.len(), 1);
    let SseItem::Event(frame) = &items[0] else {
      panic!("not an event: {:?}", items[0]);
    };
    assert_eq!(frame.event, "task");
    assert_eq!(frame.data.len(), SIZE);
    assert!(frame.data.bytes().all(|b| b == b'x'));
    // A parser that re-scanned the unfinished line on each read would look at
    // about SIZE^2 / 2 / KIB = 32 GiB here.
    let fed = input.len() as u64;
    assert!(
      parser.scanned <= 2 * fed,
      "scanned {} bytes of {fed}",
      parser.scanned
    );
    assert!(parser.line.capacity() <= KEPT_LINE_CAPACITY);
  }

  #[test]
  fn byte_by_byte_long_line_is_linear() {
    let mut input = b"data: ".to_vec();
    input.extend("é😀".repeat(8 * KIB).bytes());
    input.extend_from_slice(b"\r\n\r\n");
    let mut parser = SseParser::new(DEFAULT_MAX_FRAME_BYTES);
    let mut items = Vec::new();
    for byte in input.chunks(1) {
      parser.feed(byte, &mut items).unwrap();
    }
    assert_eq!(items, vec![event("message", &"é😀".repeat(8 * KIB), None)]);
    let fed = input.len() as u64;
    assert!(
      parser.scanned <= 2 * fed,
      "scanned {} bytes of {fed}",
      parser.scanned
    );
  }

  #[test]
  fn invalid_utf8_reports_line_offset_and_poisons() {
    let mut parser = SseParser::new(KIB);
    let mut items = Vec::new();
    // The bad line starts at byte 10; the bad byte is fed separately.
    parser.feed(b"data: ok\n\ndata: a", &mut items).unwrap();
    assert_eq!(parser.feed(b"\xff", &mut items), Ok(()));
    let error = parser.feed(b"b\ndata: c\n\n", &mut items).unwrap_err();
    assert_eq!(error, SseError::InvalidUtf8 { offset: 10 });
    assert_eq!(items, vec![event("message", "ok", None)]);
    // Poisoned: even valid input gets the same error and produces nothing.
    assert_eq!(parser.feed(b"data: d\n\n", &mut items), Err(error.clone()));
    assert_eq!(parser.feed(b"", &mut items), Err(error));
    assert_eq!(items.len(), 1);
  }

  #[test]
  fn invalid_utf8_offsets_count_bom_and_line_ends() {
    let (items, result, _) = parse_split(b"\xEF\xBB\xBF: c\r\n\r\n\xc3(\n", &[], KIB);
    assert_eq!(items, vec![SseItem::Comment]);
    assert_eq!(result, Err(SseError::InvalidUtf8 { offset: 10 }));
    // A UTF-8 sequence cut short by a line end is invalid too.
    let (_, result, _) = parse_split(b"data: \xf0\x9f\x98\ndata: x\n\n", &[7], KIB);
    assert_eq!(result, Err(SseError::InvalidUtf8 { offset: 0 }));
    // Items before the bad line in the same feed are still delivered.
    let (items, result, _) = parse_split(b"retry: 1\ndata: x\n\nevent: \xff\n", &[], KIB);
    assert_eq!(items, vec![SseItem::Retry(1), event("message", "x", None)]);
    assert_eq!(result, Err(SseError::InvalidUtf8 { offset: 18 }));
  }

  #[test]
  fn frame_without_newline_hits_limit() {
    let mut parser = SseParser::new(KIB);
    let mut items = Vec::new();
    let chunk = [b'x'; 100];
    assert_eq!(parser.feed(b"data: ", &mut items), Ok(()));
    let mut fed = 6;
    let error = loop {
      match parser.feed(&chunk, &mut items) {
        Ok(()) => {
          fed += chunk.len();
          assert!(fed <= KIB, "{fed} bytes accepted");
        }
        Err(error) => break error,
      }
    };
    assert_eq!(error, SseError::FrameTooLarge { limit: KIB });
    assert!(fed + chunk.len() > KIB);
    assert_eq!(parser.feed(b"\n\n", &mut items), Err(error));
    assert!(items.is_empty());
  }

  #[test]
  fn invalid_bytes_without_newline_hit_limit() {
    let mut parser = SseParser::new(KIB);
    let mut items = Vec::new();
    let junk = [0xffu8; 64];
    let mut result = Ok(());
    for _ in 0..100 {
      result = parser.feed(&junk, &mut items);
      assert!(parser.line.len() <= KIB);
      if result.is_err() {
        break;
      }
    }
    assert_eq!(result, Err(SseError::FrameTooLarge { limit: KIB }));
  }

  #[test]
  fn many_data_lines_hit_limit() {
    let mut parser = SseParser::new(KIB);
    let mut items = Vec::new();
    let mut result = Ok(());
    for _ in 0..1000 {
      result = parser.feed(b"data: x\n", &mut items);
      assert!(parser.data.len() <= KIB);
      if result.is_err() {
        break;
      }
    }
    assert_eq!(result, Err(SseError::FrameTooLarge { limit: KIB }));
    assert!(items.is_empty());
  }

  #[test]
  fn frame_of_exactly_the_limit_passes() {
    // Two lines of 10 bytes each, terminators not counted.
    let input = b"event: abc\ndata: 1234\n\n";
    let (items, result, _) = parse_split(input, &[], 20);
    assert_eq!(result, Ok(()));
    assert_eq!(items, vec![event("abc", "1234", None)]);
    let (_, result, _) = parse_split(input, &[], 19);
    assert_eq!(result, Err(SseError::FrameTooLarge { limit: 19 }));
  }

  #[test]
  fn comments_and_blank_lines_never_add_up() {
    let mut parser = SseParser::new(KIB);
    let mut items = Vec::new();
    for _ in 0..100_000 {
      parser.feed(b": keep-alive\n\r\n", &mut items).unwrap();
    }
    assert_eq!(items.len(), 100_000);
    assert!(items.iter().all(|item| *item == SseItem::Comment));
    // Comments inside an event do not count toward it either.
    items.clear();
    parser.feed(b"data: x\n", &mut items).unwrap();
    for _ in 0..1000 {
      parser.feed(b": still here\n", &mut items).unwrap();
    }
    parser.feed(b"\n", &mut items).unwrap();
    assert_eq!(items.last(), Some(&event("message", "x", None)));
  }

  #[test]
  fn events_under_the_limit_pass_forever() {
    let mut parser = SseParser::new(KIB);
    let mut items = Vec::new();
    let frame = format!("id: 1\nevent: task\ndata: {}\n\n", "y".repeat(900));
    for _ in 0..1000 {
      parser.feed(frame.as_bytes(), &mut items).unwrap();
    }
    assert_eq!(items.len(), 1000);
  }

  #[test]
  fn errors_read_as_english() {
    assert_eq!(
      SseError::InvalidUtf8 { offset: 42 }.to_string(),
      "event stream line starting at byte 42 is not valid UTF-8"
    );
    assert_eq!(
      SseError::FrameTooLarge { limit: 1024 }.to_string(),
      "event stream frame is larger than the 1024-byte limit"
    );
  }

  /// xorshift64*: deterministic, so a failure replays.
  struct Rng(u64);

  impl Rng {
    fn next(&mut self) -> u64 {
      self.0 ^= self.0 >> 12;
      self.0 ^= self.0 << 25;
      self.0 ^= self.0 >> 27;
      self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
      (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, choices: &[&'a str]) -> &'a str {
      choices[self.below(choices.len())]
    }
  }

  fn random_stream(rng: &mut Rng) -> String {
    const NAMES: &[&str] = &[
      "data", "data", "data", "event", "id", "retry", "foo", "", "dat",
    ];
    const SEPARATORS: &[&str] = &[": ", ":", ":  ", "", " :"];
    const PIECES: &[&str] = &[
      "a", "b c", "é", "😀", ":", " ", "\0", "12", "task", "ping", "\u{FEFF}",
    ];
    const ENDS: &[&str] = &["\n", "\r", "\r\n"];
    let mut stream = String::new();
    if rng.below(4) == 0 {
      stream.push('\u{FEFF}');
    }
    for _ in 0..rng.below(40) {
      match rng.below(10) {
        0..=1 => {}
        2 => stream.push_str(": ping"),
        _ => {
          stream.push_str(rng.pick(NAMES));
          stream.push_str(rng.pick(SEPARATORS));
          for _ in 0..rng.below(5) {
            stream.push_str(rng.pick(PIECES));
          }
        }
      }
      stream.push_str(rng.pick(ENDS));
    }
    if rng.below(3) == 0 {
      stream.push_str("data: unfinished");
    }
    stream
  }

  fn random_cuts(rng: &mut Rng, len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = (0..rng.below(8)).map(|_| rng.below(len + 1)).collect();
    cuts.sort_unstable();
    cuts
  }

  /// A plain whole-input reading of the WHATWG rules, to check the
  /// incremental parser against.
  fn reference(input: &str) -> (Vec<SseItem>, Option<String>) {
    let input = input.strip_prefix('\u{FEFF}').unwrap_or(input);
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
      match c {
        '\n' => lines.push(std::mem::take(&mut line)),
        '\r' => {
          lines.push(std::mem::take(&mut line));
          chars.next_if_eq(&'\n');
        }
        c => line.push(c),
      }
    }
    let (mut items, mut data, mut event_type, mut id) =
      (Vec::new(), String::new(), String::new(), None);
    for line in lines {
      if line.is_empty() {
        if !data.is_empty() {
          data.pop();
          let name = if event_type.is_empty() {
            "message".to_owned()
          } else {
            event_type.clone()
          };
          items.push(SseItem::Event(SseEvent {
            event: name,
            data: std::mem::take(&mut data),
            id: id.clone(),
          }));
        }
        event_type.clear();
      } else if line.starts_with(':') {
        items.push(SseItem::Comment);
      } else {
        let (name, value) = match line.find(':') {
          Some(at) => (
            &line[..at],
            line[at + 1..].strip_prefix(' ').unwrap_or(&line[at + 1..]),
          ),
          None => (&line[..], ""),
        };
        match name {
          "event" => event_type = value.to_owned(),
          "data" => data = data + value + "\n",
          "id" if !value.contains('\0') => id = Some(value.to_owned()).filter(|v| !v.is_empty()),
          "retry" if !value.is_empty() && value.chars().all(|c| c.is_ascii_digit()) => {
            items.push(SseItem::Retry(value.parse().unwrap_or(u64::MAX)));
          }
          _ => {}
        }
      }
    }
    (items, id)
  }

  #[test]
  fn random_streams_match_reference_whatever_the_split() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for case in 0..500 {
      let stream = random_stream(&mut rng);
      let (expected, expected_id) = reference(&stream);
      let (whole, result, parser) = parse_split(stream.as_bytes(), &[], DEFAULT_MAX_FRAME_BYTES);
      assert_eq!(result, Ok(()), "case {case}: {stream:?}");
      assert_eq!(whole, expected, "case {case}: {stream:?}");
      assert_eq!(
        parser.last_event_id(),
        expected_id.as_deref(),
        "case {case}"
      );
      for _ in 0..10 {
        let cuts = random_cuts(&mut rng, stream.len());
        let (split, result, parser) =
          parse_split(stream.as_bytes(), &cuts, DEFAULT_MAX_FRAME_BYTES);
        assert_eq!(result, Ok(()), "case {case}, cuts {cuts:?}: {stream:?}");
        assert_eq!(split, expected, "case {case}, cuts {cuts:?}: {stream:?}");
        assert_eq!(
          parser.last_event_id(),
          expected_id.as_deref(),
          "case {case}"
        );
      }
    }
  }

  #[test]
  fn random_bytes_give_the_same_outcome_whatever_the_split() {
    // Mostly well-formed pieces; now and then one that breaks UTF-8 (a lone
    // lead byte, a stray continuation byte, a byte never valid).
    const PIECES: &[&[u8]] = &[
      b"data: ",
      b"data: ",
      b"event:",
      b"id:",
      b": ",
      b"x",
      b"xxxxxxxx",
      b"\xc3\xa9",
      b"\r",
      b"\n",
      b"\n",
      b"\r\n",
      b"\xEF\xBB\xBF",
    ];
    const BROKEN: &[&[u8]] = &[b"\xc3", b"\xa9", b"\xff"];
    let mut rng = Rng(0x0123_4567_89AB_CDEF);
    let (mut invalid, mut too_large, mut events) = (0, 0, 0);
    for case in 0..500 {
      let mut stream = Vec::new();
      for _ in 0..rng.below(60) {
        let piece = if rng.below(80) == 0 {
          BROKEN[rng.below(BROKEN.len())]
        } else {
          PIECES[rng.below(PIECES.len())]
        };
        stream.extend_from_slice(piece);
      }
      let limit = 16 + rng.below(112);
      let whole = parse_split(&stream, &[], limit);
      match whole.1 {
        Err(SseError::InvalidUtf8 { .. }) => invalid += 1,
        Err(SseError::FrameTooLarge { .. }) => too_large += 1,
        Ok(()) => {}
      }
      events += whole
        .0
        .iter()
        .filter(|item| matches!(item, SseItem::Event(_)))
        .count();
      for _ in 0..10 {
        let cuts = random_cuts(&mut rng, stream.len());
        let split = parse_split(&stream, &cuts, limit);
        assert_eq!(
          (&split.0, &split.1),
          (&whole.0, &whole.1),
          "case {case}, limit {limit}, cuts {cuts:?}: {stream:?}"
        );
        assert!(split.2.line.len() <= limit && split.2.data.len() <= limit);
      }
    }
    // The generator must exercise every outcome.
    assert!(
      invalid > 50 && too_large > 50 && invalid + too_large < 450,
      "{invalid} invalid, {too_large} too large"
    );
    assert!(
      events > 100,
      "{events} events, {invalid} invalid, {too_large} too large"
    );
  }

  #[test]
  fn an_id_only_frame_moves_the_dispatched_id_and_resuming_keeps_it() {
    let mut parser = SseParser::new(1024);
    let mut out = Vec::new();
    parser
      .feed(
        b"id: ev-1\ndata: x\n\nid: ev-2\n\nid: ev-3\ndata: half",
        &mut out,
      )
      .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(parser.dispatched_event_id(), Some("ev-2"));
    assert_eq!(parser.last_event_id(), Some("ev-3"));
    let mut next = SseParser::resuming(1024, Some("ev-2".to_owned()));
    out.clear();
    next.feed(b"data: y\n\n", &mut out).unwrap();
    assert_eq!(
      out,
      vec![SseItem::Event(SseEvent {
        event: "message".into(),
        data: "y".into(),
        id: Some("ev-2".into())
      })]
    );
    next.feed(b"id\n\n", &mut out).unwrap();
    assert_eq!(next.dispatched_event_id(), None);
  }

  /// Property tests (proptest): a valid stream read in any split gives the
  /// reference reading's items; arbitrary bytes never panic, give the same
  /// outcome whatever the split, and never hold more than the frame limit.
  mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Lines of the WHATWG grammar (and near misses of it), with every line end.
    fn valid_stream() -> impl Strategy<Value = String> {
      let name = prop::sample::select(vec![
        "data", "data", "data", "event", "id", "retry", "foo", "", "dat", "DATA",
      ]);
      let separator = prop::sample::select(vec![": ", ":", ":  ", "", " :"]);
      let value = prop::collection::vec(
        prop_oneof![
          prop::sample::select(vec![
            "a", "é", "😀", ":", " ", "\0", "12", "\u{FEFF}", "\u{2028}"
          ])
          .prop_map(str::to_owned),
          // Any text without a line end: the value of a field may hold anything else.
          "[^\r\n]{0,8}",
        ],
        0..5,
      );
      let end = prop::sample::select(vec!["\n", "\r", "\r\n"]);
      let line = prop_oneof![
        1 => Just(String::new()),
        1 => Just(": ping".to_owned()),
        6 => (name, separator, value).prop_map(|(name, separator, value)| {
          format!("{name}{separator}{}", value.concat())
        }),
      ];
      (
        any::<bool>(),
        prop::collection::vec((line, end), 0..40),
        prop::option::of("[^\r\n]{0,8}"),
      )
        .prop_map(|(bom, lines, unfinished)| {
          let mut stream = if bom {
            "\u{FEFF}".to_owned()
          } else {
            String::new()
          };
          for (line, end) in lines {
            stream.push_str(&line);
            stream.push_str(end);
          }
          if let Some(unfinished) = unfinished {
            stream.push_str("data: ");
            stream.push_str(&unfinished);
          }
          stream
        })
    }

    /// A stream and sorted cut points in it.
    fn with_cuts<T: std::fmt::Debug + Clone + AsRef<[u8]>>(
      stream: impl Strategy<Value = T>,
    ) -> impl Strategy<Value = (T, Vec<usize>)> {
      stream.prop_flat_map(|stream| {
        let len = stream.as_ref().len();
        let cuts = prop::collection::vec(0..=len, 0..12).prop_map(|mut cuts| {
          cuts.sort_unstable();
          cuts
        });
        (Just(stream), cuts)
      })
    }

    /// Bytes that are mostly stream syntax, with any byte now and then.
    fn arbitrary_bytes() -> impl Strategy<Value = Vec<u8>> {
      let piece = prop_oneof![
        3 => prop::sample::select(vec![
          &b"data: "[..], b"event:", b"id:", b"retry: 1", b": ", b"x", b"\xc3\xa9",
          b"\r", b"\n", b"\r\n", b"\xEF\xBB\xBF",
        ])
        .prop_map(<[u8]>::to_vec),
        1 => prop::collection::vec(any::<u8>(), 0..8),
      ];
      prop::collection::vec(piece, 0..48).prop_map(|pieces| pieces.concat())
    }

    proptest! {
      #![proptest_config(crate::proptest_config(3000))]

      #[test]
      fn any_split_of_a_valid_stream_gives_the_reference_items(
        (stream, cuts) in with_cuts(valid_stream())
      ) {
        let (expected, expected_id) = reference(&stream);
        let (items, result, parser) = parse_split(stream.as_bytes(), &cuts, DEFAULT_MAX_FRAME_BYTES);
        prop_assert_eq!(result, Ok(()));
        prop_assert_eq!(items, expected);
        prop_assert_eq!(parser.last_event_id(), expected_id.as_deref());
      }

      #[test]
      fn arbitrary_bytes_never_panic_and_stay_within_the_limit(
        (stream, cuts) in with_cuts(arbitrary_bytes()),
        limit in 1usize..256,
      ) {
        let whole = parse_split(&stream, &[], limit);
        // Fed in pieces, checking the buffers after every feed.
        let mut parser = SseParser::new(limit);
        let mut items = Vec::new();
        let mut result = Ok(());
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
          result = parser.feed(&stream[start..cut], &mut items);
          prop_assert!(parser.line.len() <= limit, "line {} > {limit}", parser.line.len());
          prop_assert!(parser.data.len() <= limit, "data {} > {limit}", parser.data.len());
          prop_assert!(parser.event_type.len() <= limit);
          if result.is_err() {
            break;
          }
          start = cut;
        }
        prop_assert_eq!(&items, &whole.0);
        prop_assert_eq!(&result, &whole.1);
        // Once failed, it stays failed and holds nothing.
        if let Err(error) = &result {
          prop_assert_eq!(parser.feed(b"data: x\n\n", &mut items), Err(error.clone()));
          prop_assert_eq!(parser.line.capacity() + parser.data.capacity(), 0);
        }
      }
    }
  }
}
