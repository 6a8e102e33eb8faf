//! The protobuf codec of every `greenlight.v1` service, on both sides.
//!
//! tonic's default codec starts every call with 8 KiB encode and decode buffers, and a
//! streaming response keeps its encode buffer for as long as the stream lives. An agent's
//! sync stream lasts as long as the agent runs and is idle nearly all of that time, so on a
//! server with thousands of agents that buffer was the largest allocation of each idle
//! stream after h2's own (docs/BENCHMARKS.md). Messages are encoded and decoded the same
//! way; the buffers start small and grow to the message being handled.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Bytes each call's encode and decode buffers start with, and grow by.
const CALL_BUFFER: usize = 512;
/// Encoded bytes a streaming call gathers before handing them to HTTP/2 (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with small per-call buffers: see the module documentation.
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self {
            _messages: PhantomData,
        }
    }
}

fn call_buffers() -> BufferSettings {
    BufferSettings::new(CALL_BUFFER, YIELD_THRESHOLD)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(call_buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(call_buffers())
    }
}
