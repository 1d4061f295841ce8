//! From engine events to text: incremental detokenization and stop strings. Streaming and
//! non-streaming responses both read this one stream of chunks, so they cannot disagree.

use crate::engine::{Event, FinishReason};
use crate::error::ApiError;
use crate::sampling::TokenLogprob;
use crate::text::{IncrementalDecoder, TextCodec};
use std::sync::Arc;
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub id: u32,
    pub logprob: Option<TokenLogprob>,
}

/// Text ready to send, the tokens generated since the last chunk, and, on the last chunk, why
/// generation ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chunk {
    pub text: String,
    pub tokens: Vec<TokenInfo>,
    pub finish: Option<FinishReason>,
}

pub struct Generation {
    events: Option<mpsc::UnboundedReceiver<Event>>,
    codec: Arc<TextCodec>,
    decoder: IncrementalDecoder,
    stop: Vec<String>,
    /// Decoded text not yet sent because it could be the start of a stop string.
    held: String,
    tokens: Vec<TokenInfo>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Seconds it waited in the engine's queue for a batch slot, once admitted.
    pub queued_s: Option<f64>,
    /// Prompt tokens found in the prefix cache at admission.
    pub cached_tokens: usize,
}

impl Generation {
    pub fn new(
        events: mpsc::UnboundedReceiver<Event>,
        codec: Arc<TextCodec>,
        stop: Vec<String>,
        prompt_tokens: usize,
    ) -> Self {
        Self {
            events: Some(events),
            codec,
            decoder: IncrementalDecoder::new(),
            stop,
            held: String::new(),
            tokens: Vec::new(),
            prompt_tokens,
            completion_tokens: 0,
            queued_s: None,
            cached_tokens: 0,
        }
    }

    /// The next chunk with text or a finish reason; None after the last one.
    pub async fn next(&mut self) -> Option<Result<Chunk, ApiError>> {
        loop {
            let events = self.events.as_mut()?;
            let event = events.recv().await;
            match event {
                Some(Event::Admitted {
                    queued_s,
                    cached_tokens,
                }) => {
                    self.queued_s = Some(queued_s);
                    self.cached_tokens = cached_tokens;
                }
                Some(Event::Token { id, logprob }) => {
                    self.completion_tokens += 1;
                    self.tokens.push(TokenInfo { id, logprob });
                    let delta = match self.decoder.push(&self.codec, id) {
                        Ok(d) => d,
                        Err(e) => return Some(Err(self.fail(e))),
                    };
                    self.held.push_str(&delta);
                    if let Some(at) = self.stop_at() {
                        self.held.truncate(at);
                        return Some(Ok(self.finish(FinishReason::Stop)));
                    }
                    let keep = self.stop_prefix_len();
                    let ready = self.held.len() - keep;
                    if ready > 0 {
                        let text: String = self.held.drain(..ready).collect();
                        return Some(Ok(Chunk {
                            text,
                            tokens: std::mem::take(&mut self.tokens),
                            finish: None,
                        }));
                    }
                }
                Some(Event::Finished(reason)) => return Some(Ok(self.finish(reason))),
                Some(Event::Failed(e)) => return Some(Err(self.fail(e))),
                None => return Some(Err(self.fail("the engine stopped before the request finished".into()))),
            }
        }
    }

    /// Ends the generation; dropping the receiver tells the engine to stop this sequence
    /// (a stop string was found, or it already finished).
    fn finish(&mut self, reason: FinishReason) -> Chunk {
        self.events = None;
        Chunk {
            text: std::mem::take(&mut self.held),
            tokens: std::mem::take(&mut self.tokens),
            finish: Some(reason),
        }
    }

    fn fail(&mut self, message: String) -> ApiError {
        self.events = None;
        ApiError::Internal(message)
    }

    /// Byte offset of the earliest stop string in the held text.
    fn stop_at(&self) -> Option<usize> {
        self.stop.iter().filter_map(|s| self.held.find(s.as_str())).min()
    }

    /// Length of the longest held suffix that is a proper prefix of a stop string: it must wait
    /// for the next token to show whether the stop string completes.
    fn stop_prefix_len(&self) -> usize {
        let mut best = 0;
        for s in &self.stop {
            for (i, _) in s.char_indices().skip(1) {
                if i > best && self.held.ends_with(&s[..i]) {
                    best = i;
                }
            }
        }
        best
    }
}
