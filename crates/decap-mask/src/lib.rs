//! Masks secret values in a build's console output as it streams, so that a
//! secret appears neither in the live log nor in the stored one.
//!
//! bctool builds one [`Masker`] from the build's secret values and pushes each
//! chunk it reads from the build script's pipe through a [`StreamMasker`]
//! before writing it to the console file.
//!
//! # What is masked
//!
//! For every secret at least [`MIN_MASKED_LEN`] bytes long:
//!
//! - the value itself;
//! - for a multi-line value, each line on its own (split on `\n`, a trailing
//!   `\r` dropped), because scripts print keys and certificates line by line;
//! - its base64 encoding, in the standard and the URL-safe alphabet. A secret
//!   is often encoded inside a longer byte stream (`user:token` in a Basic
//!   auth header, a Docker `config.json`, a kubeconfig), so its encoding
//!   depends on where it sits relative to the 3-byte groups of base64: there
//!   are three alignments (offset 0, 1 or 2). For each we mask only the
//!   characters whose 6 bits come from the secret alone; the character at
//!   either edge mixes in neighbouring bytes or padding and may be anything.
//!   Those edge characters stay visible and carry at most 4 bits of the
//!   secret each.
//!
//! Strings shorter than [`MIN_MASKED_LEN`] (a secret, a line of one, an
//! encoded core) are not masked: replacing every `"yes"` or `"1"` in a log
//! would shred it while hiding almost nothing. [`Masker::skipped`] counts the
//! secrets left out entirely so the caller can warn about them.
//!
//! Other transformations (URL or JSON escaping, hex, base64 wrapped over
//! several lines) are not recognised.
//!
//! # Leftmost-longest
//!
//! Each match is replaced by [`MASK`]. Matches are chosen leftmost-longest:
//! the search takes the earliest position where any pattern starts and, of the
//! patterns starting there, the longest. When one secret is a prefix of
//! another (`pass1234` and `pass1234word`) the longer one is hidden whole,
//! where the earliest-ending match would leave `word` visible, and the result
//! does not depend on the order in which secrets were given. Matches do not
//! overlap: of two secrets that overlap in the input, the second keeps its
//! bytes past the end of the first.
//!
//! Because every unmasked stretch of output is one in which no pattern
//! starts, the output contains no pattern at all unless a pattern contains
//! `*` (and so could be completed by a mask).
//!
//! # Streaming and the hold-back rule
//!
//! A chunk boundary may cut a secret in two, so a [`StreamMasker`] holds back
//! the shortest tail that could still grow into a match: the longest suffix of
//! the data seen so far that is a proper prefix of some pattern (at most the
//! longest pattern's length minus one). Everything before it is settled:
//! a match starting before it ends inside the data seen, and leftmost-longest
//! cannot pick a different one later. Matches are not emitted early either: a
//! complete match that a longer pattern could still extend starts inside the
//! held tail and waits. Hence, for any split of an input into chunks, pushing
//! the chunks and then flushing yields exactly [`Masker::mask`] of the whole.
//!
//! # The idle flush
//!
//! The caller flushes when the stream has been idle for a moment, so that a
//! partial line (a prompt, a progress bar) still shows live. A flush releases
//! the held tail as it is, and a secret written across an idle flush (its
//! start before the pause, its end after) is then not recognised: its two
//! halves appear in the output. The held tail is a prefix of a pattern, so a
//! flush only ever shows what a script paused in the middle of printing;
//! flushing after about 100 ms of silence keeps that window small.
#![deny(missing_docs)]

use std::fmt;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use base64::Engine;
use base64::engine::GeneralPurpose;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};

/// What each match is replaced by.
pub const MASK: &[u8] = b"***";

/// Strings shorter than this are never masked.
pub const MIN_MASKED_LEN: usize = 4;

/// The patterns derived from a set of secrets, ready to mask any number of
/// streams. Cheap to clone; the automaton is shared.
#[derive(Clone)]
pub struct Masker {
    inner: Arc<Inner>,
    skipped: usize,
}

enum Inner {
    /// Nothing long enough to mask: output is input.
    Nothing,
    Search(Search),
    /// The automaton could not be built, which aho-corasick allows only past
    /// about 2 GiB of patterns. Fails closed: all output becomes one [`MASK`].
    Unbuildable,
}

struct Search {
    automaton: AhoCorasick,
    /// The patterns again, in small groups that aho-corasick can each give a
    /// vectorised prefilter; see [`screen`]. Empty when the automaton has
    /// one of its own or the groups would be too many.
    screen: Vec<AhoCorasick>,
    prefixes: PrefixTrie,
    patterns: usize,
}

impl Masker {
    /// Builds a masker for `secrets`. Empty values are ignored; values shorter
    /// than [`MIN_MASKED_LEN`] are counted in [`Masker::skipped`].
    pub fn new<I, S>(secrets: I) -> Masker
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        Masker::build(secrets, true)
    }

    /// [`Masker::new`], with or without the screen (tests compare the two).
    fn build<I, S>(secrets: I, screened: bool) -> Masker
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut patterns = Vec::new();
        let mut skipped = 0;
        for secret in secrets {
            let secret = secret.as_ref();
            if secret.is_empty() {
                continue;
            }
            if secret.len() < MIN_MASKED_LEN {
                skipped += 1;
                continue;
            }
            patterns_of(secret, &mut patterns);
        }
        patterns.sort_unstable();
        patterns.dedup();
        let inner = if patterns.is_empty() {
            Inner::Nothing
        } else {
            match build_automaton(&patterns) {
                Some(automaton) => Inner::Search(Search {
                    automaton,
                    screen: if screened {
                        screen(&patterns)
                    } else {
                        Vec::new()
                    },
                    prefixes: PrefixTrie::new(&patterns),
                    patterns: patterns.len(),
                }),
                None => Inner::Unbuildable,
            }
        };
        Masker {
            inner: Arc::new(inner),
            skipped,
        }
    }

    /// Whether there is nothing to mask (output equals input).
    pub fn is_empty(&self) -> bool {
        matches!(*self.inner, Inner::Nothing)
    }

    /// How many non-empty secrets were too short to be masked at all.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Masks a whole input at once.
    pub fn mask(&self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len());
        match &*self.inner {
            Inner::Nothing => out.extend_from_slice(input),
            Inner::Search(search) => search.mask_into(input, &mut out),
            Inner::Unbuildable => {
                if !input.is_empty() {
                    out.extend_from_slice(MASK);
                }
            }
        }
        out
    }

    /// Starts masking one stream.
    pub fn stream(&self) -> StreamMasker {
        StreamMasker {
            inner: Arc::clone(&self.inner),
            held: Vec::new(),
            swallowing: false,
        }
    }
}

impl fmt::Debug for Masker {
    /// Shows counts only, never a pattern.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = f.debug_struct("Masker");
        match &*self.inner {
            Inner::Nothing => shown.field("patterns", &0),
            Inner::Search(search) => shown.field("patterns", &search.patterns),
            Inner::Unbuildable => shown.field("unbuildable", &true),
        };
        shown.field("skipped", &self.skipped).finish()
    }
}

/// Masks one stream chunk by chunk; see the crate docs for the hold-back
/// rule. Made by [`Masker::stream`].
pub struct StreamMasker {
    inner: Arc<Inner>,
    /// The longest suffix of the input so far that could still grow into a
    /// match; not yet written out.
    held: Vec<u8>,
    /// For [`Inner::Unbuildable`]: the one mask has been written.
    swallowing: bool,
}

impl StreamMasker {
    /// Masks `input`, appending to `out` every byte that no later input can
    /// turn into part of a match, and holds back the rest.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        match &*self.inner {
            Inner::Nothing => out.extend_from_slice(input),
            Inner::Search(search) => {
                out.reserve(input.len());
                if self.held.is_empty() {
                    let settled = search.emit_settled(input, out);
                    self.held.extend_from_slice(&input[settled..]);
                } else {
                    self.held.extend_from_slice(input);
                    let settled = search.emit_settled(&self.held, out);
                    self.held.drain(..settled);
                }
            }
            Inner::Unbuildable => {
                if !input.is_empty() && !self.swallowing {
                    out.extend_from_slice(MASK);
                    self.swallowing = true;
                }
            }
        }
    }

    /// Masks and appends what is held back, as at the end of the stream.
    ///
    /// Call it at the end, and when the stream has been idle for a moment so
    /// a partial line still shows. A flush in the middle of the stream ends
    /// any match in progress: a secret written partly before and partly
    /// after it is not recognised, and its two halves appear in the output.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if let Inner::Search(search) = &*self.inner {
            search.mask_into(&self.held, out);
        }
        self.held.clear();
    }

    /// How many bytes are held back.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

impl fmt::Debug for StreamMasker {
    /// Shows how much is held, never the bytes (a prefix of a secret).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamMasker")
            .field("held", &self.held.len())
            .finish()
    }
}

impl Search {
    /// Whether no pattern occurs anywhere in `input`, as the screen can
    /// tell quickly (false when there is no screen).
    fn surely_clear(&self, input: &[u8]) -> bool {
        !self.screen.is_empty() && !self.screen.iter().any(|group| group.is_match(input))
    }

    fn mask_into(&self, input: &[u8], out: &mut Vec<u8>) {
        if self.surely_clear(input) {
            out.extend_from_slice(input);
            return;
        }
        let mut done = 0;
        for found in self.automaton.find_iter(input) {
            out.extend_from_slice(&input[done..found.start()]);
            out.extend_from_slice(MASK);
            done = found.end();
        }
        out.extend_from_slice(&input[done..]);
    }

    /// Masks and appends the settled part of `buf`, which starts where the
    /// search of the whole stream stands, and returns where the unsettled
    /// tail starts.
    ///
    /// A match that could continue past the end of `buf` starts in the open
    /// tail: `buf[open..]` is the longest suffix that is a proper prefix of a
    /// pattern. Any match found starting before `open` ends inside `buf`, and
    /// so does every longer match at the same start, so leftmost-longest picks
    /// it whatever follows.
    fn emit_settled(&self, buf: &[u8], out: &mut Vec<u8>) -> usize {
        let mut done = 0;
        let mut open = self.open_tail(buf, 0);
        if self.surely_clear(buf) {
            out.extend_from_slice(&buf[..open]);
            return open;
        }
        for found in self.automaton.find_iter(buf) {
            if found.start() >= open {
                break;
            }
            out.extend_from_slice(&buf[done..found.start()]);
            out.extend_from_slice(MASK);
            done = found.end();
            if done > open {
                // The match ran into the old tail; look for one after it.
                open = self.open_tail(buf, done);
            }
        }
        out.extend_from_slice(&buf[done..open]);
        open
    }

    /// Where the longest suffix of `buf[from..]` that is a proper prefix of
    /// some pattern starts (`buf.len()` if there is none).
    fn open_tail(&self, buf: &[u8], from: usize) -> usize {
        let window = buf.len().saturating_sub(self.prefixes.longest).max(from);
        buf.len() - self.prefixes.longest_suffix(&buf[window..])
    }
}

/// The most memory the automaton may take as a DFA. Past it, a contiguous
/// NFA: a few times slower, but linear in the size of the patterns.
const DFA_BUDGET: usize = 32 << 20;

/// Builds the automaton, choosing its kind rather than leaving it to
/// aho-corasick: that picks an NFA for more than 100 patterns (20 secrets
/// make about 140), and a DFA of any size for fewer.
fn build_automaton(patterns: &[Vec<u8>]) -> Option<AhoCorasick> {
    let mut builder = AhoCorasick::builder();
    builder.match_kind(MatchKind::LeftmostLongest);
    if dfa_size_bound(patterns) <= DFA_BUDGET {
        builder.kind(Some(AhoCorasickKind::DFA));
        if let Ok(automaton) = builder.build(patterns) {
            return Some(automaton);
        }
    }
    builder.kind(Some(AhoCorasickKind::ContiguousNFA));
    if let Ok(automaton) = builder.build(patterns) {
        return Some(automaton);
    }
    builder.kind(Some(AhoCorasickKind::NoncontiguousNFA));
    builder.build(patterns).ok()
}

/// Patterns per screening group: aho-corasick gives an automaton a
/// prefilter (Teddy, or a search for rare bytes) only for a few dozen
/// patterns, and without one its DFA scans about 300 MB/s here. Twenty
/// secrets make about 80 patterns after de-duplication (each raw and as
/// base64 at three alignments).
const SCREEN_GROUP: usize = 32;

/// At most this many groups: each is a pass over the output, and past
/// eight the passes could cost more than the one scan they spare.
const SCREEN_GROUPS_MAX: usize = 8;

/// Groups of the patterns, each its own automaton with a prefilter, to tell
/// quickly that a chunk of output holds no pattern at all (the usual case)
/// before the full leftmost-longest search. In one run of 200 MB of
/// compiler-like lines with 20 secrets: about 300 MB/s for the full DFA,
/// several GB/s for the screen.
fn screen(patterns: &[Vec<u8>]) -> Vec<AhoCorasick> {
    if patterns.len() <= SCREEN_GROUP || patterns.len() > SCREEN_GROUP * SCREEN_GROUPS_MAX {
        return Vec::new();
    }
    let mut groups = Vec::new();
    for group in patterns.chunks(SCREEN_GROUP) {
        match AhoCorasick::builder()
            .kind(Some(AhoCorasickKind::DFA))
            .build(group)
        {
            Ok(automaton) => groups.push(automaton),
            // No screen at all rather than one that misses a group.
            Err(_) => return Vec::new(),
        }
    }
    groups
}

/// An upper bound on the size of the patterns' DFA: at most a state per
/// pattern byte (plus the special ones), each with a 4-byte transition per
/// byte class, their number rounded up to a power of two. Each distinct byte
/// adds at most two classes.
fn dfa_size_bound(patterns: &[Vec<u8>]) -> usize {
    let mut seen = [false; 256];
    let mut states = 3usize;
    for pattern in patterns {
        states = states.saturating_add(pattern.len());
        for &byte in pattern {
            seen[usize::from(byte)] = true;
        }
    }
    let distinct = seen.iter().filter(|&&seen| seen).count();
    let classes = (2 * distinct + 1).min(256).next_power_of_two();
    states.saturating_mul(classes).saturating_mul(4)
}

/// Appends the patterns that mask `secret`, those shorter than
/// [`MIN_MASKED_LEN`] left out.
fn patterns_of(secret: &[u8], patterns: &mut Vec<Vec<u8>>) {
    let mut add = |pattern: &[u8]| {
        if pattern.len() >= MIN_MASKED_LEN {
            patterns.push(pattern.to_vec());
        }
    };
    add(secret);
    if secret.contains(&b'\n') {
        for line in secret.split(|&b| b == b'\n') {
            add(line.strip_suffix(b"\r").unwrap_or(line));
        }
    }
    for engine in [STANDARD_NO_PAD, URL_SAFE_NO_PAD] {
        for offset in 0..3 {
            add(&base64_core(&engine, secret, offset));
        }
    }
}

/// The base64 characters that `secret` alone determines when it starts
/// `offset` bytes into a 3-byte group of the encoded stream.
fn base64_core(engine: &GeneralPurpose, secret: &[u8], offset: usize) -> Vec<u8> {
    let mut stream = vec![0; offset];
    stream.extend_from_slice(secret);
    let encoded = engine.encode(&stream);
    // Character j holds bits 6j..6j+6 of the stream; the secret's bits are
    // 8*offset..8*(offset+len).
    let first = (8 * offset).div_ceil(6);
    let end = 8 * (offset + secret.len()) / 6;
    encoded
        .as_bytes()
        .get(first..end)
        .map(<[u8]>::to_vec)
        .unwrap_or_default()
}

/// The proper prefixes of all patterns as a trie with failure links (the
/// Aho-Corasick construction), to find the longest suffix of a buffer that a
/// pattern could still complete in time linear in the suffix window.
///
/// Nodes are numbered breadth first, so a node's children are consecutive
/// and sorted by byte, and the trie is a few flat arrays. Node numbers fit in
/// `u32`: the automaton, built first, has more states and aho-corasick caps
/// them below 2^31.
struct PrefixTrie {
    nodes: Vec<TrieNode>,
    /// Per node, the byte leading to it.
    bytes: Vec<u8>,
    /// The root's children by byte (`ROOT` for none): the step taken most.
    root: Box<[u32; 256]>,
    /// The deepest node: the longest pattern's length minus one.
    longest: usize,
}

struct TrieNode {
    /// The node's children, a range of node numbers.
    children: (u32, u32),
    /// The node for the longest proper suffix of this node's prefix.
    fail: u32,
    depth: u32,
}

const ROOT: u32 = 0;

impl PrefixTrie {
    /// `patterns` must be sorted.
    fn new(patterns: &[Vec<u8>]) -> PrefixTrie {
        let proper: Vec<&[u8]> = patterns
            .iter()
            .map(|pattern| &pattern[..pattern.len().saturating_sub(1)])
            .collect();
        let longest = proper.iter().map(|prefix| prefix.len()).max().unwrap_or(0);
        let mut trie = PrefixTrie {
            nodes: vec![TrieNode {
                children: (0, 0),
                fail: ROOT,
                depth: 0,
            }],
            bytes: vec![0],
            root: Box::new([ROOT; 256]),
            longest,
        };
        // One level at a time. The prefixes of one length come in sorted
        // order, so equal ones are adjacent and a parent's children are made
        // one after the other, by increasing byte. `at[i]` is the node for
        // `proper[i]` cut to the level above.
        let mut at = vec![ROOT; proper.len()];
        for level in 0..longest {
            let mut last: Option<(u32, u8, u32)> = None;
            for (prefix, at) in proper.iter().zip(at.iter_mut()) {
                let Some(&byte) = prefix.get(level) else {
                    continue;
                };
                let parent = *at;
                *at = match last {
                    Some((p, b, node)) if (p, b) == (parent, byte) => node,
                    _ => trie.add_child(parent, byte),
                };
                last = Some((parent, byte, *at));
            }
        }
        trie
    }

    fn add_child(&mut self, parent: u32, byte: u8) -> u32 {
        let node = self.nodes.len() as u32;
        // The failure link is found from the parent's, which is shallower, and
        // follows only nodes whose children are all made (levels above).
        let fail = if parent == ROOT {
            self.root[usize::from(byte)] = node;
            ROOT
        } else {
            self.step(self.nodes[parent as usize].fail, byte)
        };
        let parent = &mut self.nodes[parent as usize];
        if parent.children.0 == parent.children.1 {
            parent.children.0 = node;
        }
        parent.children.1 = node + 1;
        let depth = parent.depth + 1;
        self.nodes.push(TrieNode {
            children: (node + 1, node + 1),
            fail,
            depth,
        });
        self.bytes.push(byte);
        node
    }

    fn child(&self, node: u32, byte: u8) -> Option<u32> {
        if node == ROOT {
            let child = self.root[usize::from(byte)];
            return (child != ROOT).then_some(child);
        }
        let (first, end) = self.nodes[node as usize].children;
        let bytes = &self.bytes[first as usize..end as usize];
        bytes
            .binary_search(&byte)
            .ok()
            .map(|index| first + index as u32)
    }

    /// The node for the longest suffix of `node`'s prefix followed by `byte`.
    fn step(&self, mut node: u32, byte: u8) -> u32 {
        loop {
            if let Some(child) = self.child(node, byte) {
                return child;
            }
            if node == ROOT {
                return ROOT;
            }
            node = self.nodes[node as usize].fail;
        }
    }

    /// The length of the longest suffix of `window` that is in the trie.
    fn longest_suffix(&self, window: &[u8]) -> usize {
        let node = window
            .iter()
            .fold(ROOT, |node, &byte| self.step(node, byte));
        self.nodes[node as usize].depth as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    use proptest::prelude::*;

    fn stream_in_chunks(masker: &Masker, input: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut stream = masker.stream();
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            let cut = cut.clamp(start, input.len());
            stream.push(&input[start..cut], &mut out);
            assert!(stream.held() <= longest_pattern(masker).saturating_sub(1));
            start = cut;
        }
        stream.push(&input[start..], &mut out);
        stream.flush(&mut out);
        assert_eq!(stream.held(), 0);
        out
    }

    fn longest_pattern(masker: &Masker) -> usize {
        match &*masker.inner {
            Inner::Search(search) => search.prefixes.longest + 1,
            _ => 0,
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn masks_the_raw_value() {
        let masker = Masker::new(["hunter22"]);
        assert_eq!(
            masker.mask(b"pw=hunter22; again hunter22"),
            b"pw=***; again ***"
        );
        assert_eq!(masker.mask(b"hunter2"), b"hunter2");
    }

    #[test]
    fn masks_a_multi_line_value_whole_and_line_by_line() {
        let key = "-----BEGIN KEY-----\r\nMIIEvQIBADANBg\r\nkqhkiG9w0BAQ\r\n-----END KEY-----\r\n";
        let masker = Masker::new([key]);
        assert_eq!(masker.mask(format!("[{key}]").as_bytes()), b"[***]");
        assert_eq!(
            masker.mask(b"line MIIEvQIBADANBg\nand kqhkiG9w0BAQ\n"),
            b"line ***\nand ***\n"
        );
    }

    #[test]
    fn lines_shorter_than_the_minimum_are_left_alone() {
        let masker = Masker::new(["ab\nlonger line"]);
        assert_eq!(masker.mask(b"ab longer line"), b"ab ***");
    }

    #[test]
    fn the_longest_of_two_secrets_sharing_a_prefix_is_masked_whole() {
        let masker = Masker::new(["pass1234", "pass1234word"]);
        assert_eq!(masker.mask(b"pass1234word pass1234 "), b"*** *** ");
        // And the result does not depend on the order of the secrets.
        let reversed = Masker::new(["pass1234word", "pass1234"]);
        assert_eq!(reversed.mask(b"pass1234word pass1234 "), b"*** *** ");
    }

    #[test]
    fn of_two_overlapping_secrets_the_leftmost_is_masked() {
        let masker = Masker::new(["abcdef", "defghi"]);
        assert_eq!(masker.mask(b"abcdefghi"), b"***ghi");
        assert_eq!(masker.mask(b"xdefghiabcdef"), b"x******");
    }

    #[test]
    fn only_a_secret_containing_the_mask_can_be_completed_by_it() {
        // The one way a pattern survives: the mask itself completes it.
        let masker = Masker::new(["x***"]);
        assert_eq!(masker.mask(b"xx***"), b"x***");
    }

    #[test]
    fn short_secrets_are_skipped_and_counted() {
        let masker = Masker::new(["abc", "", "1", "abcd"]);
        assert_eq!(masker.skipped(), 2);
        assert!(!masker.is_empty());
        assert_eq!(masker.mask(b"abc abcd 1"), b"abc *** 1");
        let only_short = Masker::new(["abc", "xy"]);
        assert!(only_short.is_empty());
        assert_eq!(only_short.skipped(), 2);
        assert_eq!(only_short.mask(b"abc xy"), b"abc xy");
    }

    #[test]
    fn without_secrets_output_is_input() {
        let masker = Masker::new(Vec::<Vec<u8>>::new());
        assert!(masker.is_empty());
        assert_eq!(masker.skipped(), 0);
        let mut stream = masker.stream();
        let mut out = Vec::new();
        stream.push(b"some output", &mut out);
        assert_eq!(stream.held(), 0);
        assert_eq!(out, b"some output");
    }

    #[test]
    fn a_stream_holds_back_only_what_could_still_become_a_match() {
        let masker = Masker::new(["secret99"]);
        let mut stream = masker.stream();
        let mut out = Vec::new();
        stream.push(b"log: secr", &mut out);
        assert_eq!(out, b"log: ");
        assert_eq!(stream.held(), 4);
        stream.push(b"ecy ", &mut out);
        assert_eq!(out, b"log: secrecy ");
        assert_eq!(stream.held(), 0);
        stream.push(b"secret", &mut out);
        stream.push(b"99 done", &mut out);
        assert_eq!(out, b"log: secrecy *** done");

        // "efghij" could begin the second secret, but the first is masked
        // from the left, so only what follows its match may be held.
        let masker = Masker::new(["abcdefgh", "efghijklmn"]);
        let mut stream = masker.stream();
        out.clear();
        stream.push(b"abcdefghij", &mut out);
        assert_eq!(out, b"***ij");
        assert_eq!(stream.held(), 0);
    }

    #[test]
    fn a_match_a_longer_secret_could_extend_waits_for_more_input() {
        let masker = Masker::new(["abcd1234", "abcd1234efgh"]);
        let mut out = Vec::new();
        let mut stream = masker.stream();
        stream.push(b"abcd1234", &mut out);
        assert_eq!(out, b"", "the longer secret may follow");
        stream.push(b"efgh.", &mut out);
        assert_eq!(out, b"***.");

        out.clear();
        let mut stream = masker.stream();
        stream.push(b"abcd1234", &mut out);
        stream.push(b"ef", &mut out);
        stream.push(b".", &mut out);
        assert_eq!(out, b"***ef.");
    }

    #[test]
    fn flush_masks_a_complete_match_and_releases_a_partial_one() {
        let masker = Masker::new(["abcd1234", "abcd1234efgh"]);
        let mut out = Vec::new();
        let mut stream = masker.stream();
        stream.push(b"abcd1234", &mut out);
        stream.flush(&mut out);
        assert_eq!(out, b"***");

        // The idle-flush caveat: a secret split across a flush shows.
        out.clear();
        let masker = Masker::new(["hunter22"]);
        let mut stream = masker.stream();
        stream.push(b"hunt", &mut out);
        stream.flush(&mut out);
        stream.push(b"er22", &mut out);
        stream.flush(&mut out);
        assert_eq!(out, b"hunter22");
    }

    #[test]
    fn byte_by_byte_equals_all_at_once() {
        let masker = Masker::new(["pass1234", "pass1234word", "zzzz", "a\nmulti-line\nsecret"]);
        let input: &[u8] = b"pass1234wor pass1234word zzzzzz a\nmulti-line\nsecre secret\n";
        let every_byte: Vec<usize> = (0..input.len()).collect();
        assert_eq!(
            stream_in_chunks(&masker, input, &every_byte),
            masker.mask(input)
        );
    }

    #[test]
    fn a_masker_that_could_not_be_built_masks_everything() {
        let masker = Masker {
            inner: Arc::new(Inner::Unbuildable),
            skipped: 0,
        };
        assert!(!masker.is_empty());
        assert_eq!(masker.mask(b""), b"");
        assert_eq!(masker.mask(b"anything\nat all"), MASK);
        assert_eq!(
            stream_in_chunks(&masker, b"anything\nat all", &[3, 9]),
            MASK
        );
    }

    #[test]
    fn maskers_can_cross_threads_and_never_show_secrets_in_debug() {
        fn send_and_sync<T: Send + Sync>() {}
        send_and_sync::<Masker>();
        send_and_sync::<StreamMasker>();
        let masker = Masker::new(["hunter22"]);
        let mut stream = masker.stream();
        stream.push(b"hunter", &mut Vec::new());
        let shown = format!("{masker:?} {stream:?}");
        assert!(!shown.contains("hunt"), "{shown}");
    }

    /// A secret encoded within a longer stream, at every alignment and in
    /// both alphabets: the characters it alone determines are masked, the
    /// edges stay.
    fn base64_check(engine: &GeneralPurpose, before: &[u8], secret: &[u8], after: &[u8]) {
        let masker = Masker::new([secret]);
        let mut stream = before.to_vec();
        stream.extend_from_slice(secret);
        stream.extend_from_slice(after);
        let encoded = engine.encode(&stream).into_bytes();
        let first = (before.len() * 8).div_ceil(6);
        let end = (before.len() + secret.len()) * 8 / 6;
        let mut expected = encoded[..first].to_vec();
        expected.extend_from_slice(MASK);
        expected.extend_from_slice(&encoded[end..]);
        assert_eq!(
            String::from_utf8_lossy(&masker.mask(&encoded)),
            String::from_utf8_lossy(&expected)
        );
        assert!(!contains(&masker.mask(&encoded), &encoded[first..end]));
    }

    #[test]
    fn masks_base64_at_each_alignment_known_example() {
        // "Basic " + base64("user:s3cr3t-t0k3n") at offset 5.
        let masker = Masker::new(["s3cr3t-t0k3n"]);
        let header = format!("Basic {}", STANDARD.encode("user:s3cr3t-t0k3n"));
        assert_eq!(header, "Basic dXNlcjpzM2NyM3QtdDBrM24=");
        assert_eq!(masker.mask(header.as_bytes()), b"Basic dXNlcjp***4=");
    }

    proptest! {
        #[test]
        fn masks_base64_at_each_alignment(
            before in proptest::collection::vec(any::<u8>(), 0..6),
            secret in proptest::collection::vec(any::<u8>(), 12..48),
            after in proptest::collection::vec(any::<u8>(), 0..6),
        ) {
            base64_check(&STANDARD, &before, &secret, &after);
            base64_check(&URL_SAFE, &before, &secret, &after);
            base64_check(&STANDARD_NO_PAD, &before, &secret, &after);
        }
    }

    /// A piece of generated input.
    #[derive(Debug, Clone)]
    enum Piece {
        Filler(Vec<u8>),
        Secret(usize),
        /// A secret encoded after `lead` bytes, standard or URL-safe.
        Encoded(usize, Vec<u8>, bool),
        /// A secret's first `len` bytes.
        Partial(usize, usize),
    }

    /// Small alphabets, so secrets overlap, share prefixes and turn up in
    /// filler by chance.
    fn secrets() -> impl Strategy<Value = Vec<Vec<u8>>> {
        let byte = proptest::sample::select(b"abc\n\r".to_vec());
        proptest::collection::vec(proptest::collection::vec(byte, 1..12), 0..5)
    }

    fn input(secrets: usize) -> impl Strategy<Value = Vec<Piece>> {
        let filler = proptest::sample::select(b"abc*\nxYW".to_vec());
        let index = 0..secrets.max(1);
        let piece = prop_oneof![
            proptest::collection::vec(filler, 0..8).prop_map(Piece::Filler),
            index.clone().prop_map(Piece::Secret),
            (
                index.clone(),
                proptest::collection::vec(any::<u8>(), 0..3),
                any::<bool>()
            )
                .prop_map(|(i, lead, url)| Piece::Encoded(i, lead, url)),
            (index, 0..12usize).prop_map(|(i, len)| Piece::Partial(i, len)),
        ];
        proptest::collection::vec(piece, 0..24)
    }

    fn assemble(secrets: &[Vec<u8>], pieces: &[Piece]) -> Vec<u8> {
        let mut input = Vec::new();
        for piece in pieces {
            let secret = |i: usize| secrets.get(i).cloned().unwrap_or_default();
            match piece {
                Piece::Filler(bytes) => input.extend_from_slice(bytes),
                Piece::Secret(i) => input.extend_from_slice(&secret(*i)),
                Piece::Encoded(i, lead, url) => {
                    let mut stream = lead.clone();
                    stream.extend_from_slice(&secret(*i));
                    let engine = if *url { URL_SAFE } else { STANDARD };
                    input.extend_from_slice(engine.encode(stream).as_bytes());
                }
                Piece::Partial(i, len) => {
                    let s = secret(*i);
                    input.extend_from_slice(&s[..(*len).min(s.len())]);
                }
            }
        }
        input
    }

    fn secrets_and_input() -> impl Strategy<Value = (Vec<Vec<u8>>, Vec<u8>)> {
        secrets().prop_flat_map(|secrets| {
            let n = secrets.len();
            (Just(secrets), input(n)).prop_map(|(secrets, pieces)| {
                let input = assemble(&secrets, &pieces);
                (secrets, input)
            })
        })
    }

    proptest! {
        #[test]
        fn the_prefix_trie_finds_the_longest_suffix_a_pattern_could_complete(
            mut patterns in proptest::collection::vec(
                proptest::collection::vec(proptest::sample::select(b"abc".to_vec()), 1..8),
                1..6,
            ),
            window in proptest::collection::vec(proptest::sample::select(b"abcd".to_vec()), 0..16),
        ) {
            patterns.sort_unstable();
            patterns.dedup();
            let trie = PrefixTrie::new(&patterns);
            let expected = (0..=window.len())
                .rev()
                .find(|&len| {
                    let suffix = &window[window.len() - len..];
                    patterns.iter().any(|p| p.len() > len && p.starts_with(suffix))
                })
                .unwrap_or(0);
            prop_assert_eq!(trie.longest_suffix(&window), expected);
        }
    }

    /// Enough secrets for more patterns than one screening group holds.
    fn many_secrets_and_input() -> impl Strategy<Value = (Vec<Vec<u8>>, Vec<u8>)> {
        let byte = proptest::sample::select(b"abcd\n".to_vec());
        proptest::collection::vec(proptest::collection::vec(byte, 4..14), 8..24).prop_flat_map(
            |secrets| {
                let n = secrets.len();
                (Just(secrets), input(n)).prop_map(|(secrets, pieces)| {
                    let input = assemble(&secrets, &pieces);
                    (secrets, input)
                })
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The screen only skips work: with it, whole and streamed output is
        /// what the full search alone gives.
        #[test]
        fn the_screen_changes_nothing(
            (secrets, input) in many_secrets_and_input(),
            mut cuts in proptest::collection::vec(0..200usize, 0..16),
        ) {
            let screened = Masker::new(&secrets);
            let plain = Masker::build(&secrets, false);
            if let Inner::Search(search) = &*screened.inner {
                prop_assert!(search.patterns <= SCREEN_GROUP || !search.screen.is_empty());
            }
            let expected = plain.mask(&input);
            prop_assert_eq!(&screened.mask(&input), &expected);
            cuts.sort_unstable();
            prop_assert_eq!(&stream_in_chunks(&screened, &input, &cuts), &expected);
        }
    }

    #[test]
    fn twenty_secrets_get_a_screen_that_still_masks_them() {
        let secrets: Vec<String> = (0..20)
            .map(|i| format!("s3cr3t-{i:02}-{}", "k".repeat(24 + i)))
            .collect();
        let masker = Masker::new(&secrets);
        let Inner::Search(search) = &*masker.inner else {
            panic!("no search for 20 secrets");
        };
        assert!(
            search.patterns > SCREEN_GROUP,
            "{} patterns",
            search.patterns
        );
        assert!(!search.screen.is_empty());
        let mut input = b"a line of build output\n".repeat(5000);
        let clean = masker.mask(&input);
        assert_eq!(clean, input);
        input.extend_from_slice(secrets[19].as_bytes());
        input.extend_from_slice(b" and ");
        input.extend_from_slice(
            STANDARD
                .encode(format!("x{}", secrets[7]).as_bytes())
                .as_bytes(),
        );
        let out = masker.mask(&input);
        for secret in &secrets {
            assert!(!contains(&out, secret.as_bytes()));
        }
        assert!(
            out.ends_with(b"***"),
            "{:?}",
            String::from_utf8_lossy(&out[out.len() - 80..])
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn chunking_does_not_change_the_output(
            (secrets, input) in secrets_and_input(),
            mut cuts in proptest::collection::vec(0..200usize, 0..16),
        ) {
            let masker = Masker::new(&secrets);
            cuts.sort_unstable();
            prop_assert_eq!(stream_in_chunks(&masker, &input, &cuts), masker.mask(&input));
        }

        /// Every unmasked stretch of output is one where no pattern starts,
        /// and a pattern without `*` cannot run into a mask: so none of them
        /// (value, lines, encoded cores) is left in the output.
        #[test]
        fn no_pattern_survives(
            (secrets, input) in secrets_and_input(),
        ) {
            let masker = Masker::new(&secrets);
            let out = masker.mask(&input);
            for secret in &secrets {
                let mut patterns = Vec::new();
                patterns_of(secret, &mut patterns);
                if secret.len() < MIN_MASKED_LEN {
                    continue;
                }
                prop_assert!(!contains(&out, secret), "{:?} in {:?}", secret, out);
                for pattern in patterns {
                    prop_assert!(!contains(&out, &pattern), "{:?} in {:?}", pattern, out);
                }
            }
        }

        #[test]
        fn without_secrets_nothing_changes(
            input in proptest::collection::vec(any::<u8>(), 0..512),
            short in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..MIN_MASKED_LEN), 0..4),
            mut cuts in proptest::collection::vec(0..512usize, 0..8),
        ) {
            cuts.sort_unstable();
            for masker in [Masker::new(Vec::<Vec<u8>>::new()), Masker::new(&short)] {
                prop_assert!(masker.is_empty());
                prop_assert_eq!(&masker.mask(&input), &input);
                prop_assert_eq!(&stream_in_chunks(&masker, &input, &cuts), &input);
            }
        }
    }
}
