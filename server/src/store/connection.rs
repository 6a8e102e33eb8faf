//! Connections to Redis, one server or a Redis Cluster, for every part of the server that
//! keeps state there (the store, the previews).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion};

use crate::config::RedisSettings;

/// Where the Redis data lives: one server, or a Redis Cluster whose client follows `MOVED`
/// and `ASK` redirections.
#[derive(Clone)]
pub(crate) enum Source {
    Single(redis::Client),
    Cluster(Box<ClusterClient>),
}

/// A connection to either.
#[derive(Clone)]
pub(crate) enum Conn {
    /// Reconnects by itself: every command but blocking reads.
    ///
    /// It speaks RESP3, so that its connection tells it the moment Redis closes it (a
    /// restart, a proxy's idle timeout) and it reconnects at once, instead of learning it
    /// from the next command, which would fail: a webhook answered 503 is never redelivered
    /// by GitLab. A reconnection made while Redis is still down fails, and so would the
    /// next command, which never reached Redis: that command is sent once more, on the new
    /// connection the failure started. A command that may have reached Redis is never sent
    /// twice: a conditional write (an agent's state, a registry change, an operator's
    /// pause) must not report a conflict with itself.
    Managed(ConnectionManager),
    /// Of its own, for blocking reads that must not stall other commands.
    Plain(MultiplexedConnection),
    /// A cluster connection with the time its caller waits for an answer.
    ///
    /// The cluster client sends a command again when its node does not answer in time, and
    /// a script that ran twice would report a conflict with itself or record a fact twice.
    /// So the caller's wait ends before the node's time is up: a command given up on is no
    /// longer sent again, and its outcome is unknown, as on one server. The client still
    /// follows redirections and sends again on a connection that broke (a failover).
    Cluster(ClusterConnection, Duration),
}

/// How long a command on the shared connection waits for its answer: a webhook answers 503
/// well within GitLab's 10 s when Redis does not answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// How long a node has to answer past the caller's wait before the cluster client counts it
/// as timed out, which would send the command again. Every attempt of a command (a
/// redirection's too) starts its node's time no earlier than the caller began to wait, so
/// any margin will do; a short one keeps the client's own commands (slot refreshes) from
/// waiting long on a node that hangs.
const NODE_GRACE: Duration = Duration::from_secs(1);
/// The cluster client's pause before it tries a command again after `TRYAGAIN` (keys of a
/// slot being moved), `CLUSTERDOWN` or `LOADING`, in milliseconds: its default (1.28 s at
/// least) would let a caller's 2 s wait see one attempt more at most.
const RETRY_WAIT_MS: (u64, u64) = (50, 500);

/// `answer`, or a timeout error once `wait` passed: the cluster client would otherwise
/// wait for a stalled node, and send the command again, for as long as it likes.
async fn within<T>(
    wait: Duration,
    answer: impl Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    tokio::time::timeout(wait, answer)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer from the Redis Cluster within {wait:?}"),
            )
            .into())
        })
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Managed(conn) => Box::pin(async move {
                match conn.send_packed_command(cmd).await {
                    Err(error) if error.is_connection_refusal() => {
                        conn.send_packed_command(cmd).await
                    }
                    answered => answered,
                }
            }),
            Self::Plain(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn, wait) => Box::pin(within(*wait, conn.req_packed_command(cmd))),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Managed(conn) => Box::pin(async move {
                match conn.send_packed_commands(pipeline, offset, count).await {
                    Err(error) if error.is_connection_refusal() => {
                        conn.send_packed_commands(pipeline, offset, count).await
                    }
                    answered => answered,
                }
            }),
            Self::Plain(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn, wait) => Box::pin(within(
                *wait,
                conn.req_packed_commands(pipeline, offset, count),
            )),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Managed(conn) => conn.get_db(),
            Self::Plain(conn) => conn.get_db(),
            Self::Cluster(conn, _) => conn.get_db(),
        }
    }
}

impl Source {
    /// The server of `settings.url`, or the cluster of `settings.cluster_nodes`.
    pub(crate) fn open(settings: &RedisSettings) -> redis::RedisResult<Self> {
        Ok(if settings.cluster_nodes.is_empty() {
            Self::Single(redis::Client::open(settings.url.as_str())?)
        } else {
            Self::Cluster(Box::new(
                ClusterClientBuilder::new(settings.cluster_nodes.iter().map(String::as_str))
                    .min_retry_wait(RETRY_WAIT_MS.0)
                    .max_retry_wait(RETRY_WAIT_MS.1)
                    .build()?,
            ))
        })
    }

    /// The connection every command but blocking reads shares; made lazily, so that the
    /// server starts while Redis is down.
    pub(crate) fn shared(&self) -> redis::RedisResult<Conn> {
        Ok(match self {
            Self::Single(client) => {
                let info = client.get_connection_info().clone();
                let resp3 = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                let client = redis::Client::open(info.set_redis_settings(resp3))?;
                // Fail fast while Redis is down: webhooks must answer 503 well within
                // GitLab's 10 s.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    .set_response_timeout(Some(ANSWER_WITHIN))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                Conn::Managed(ConnectionManager::new_lazy_with_config(client, config)?)
            }
            Self::Cluster(client) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(Duration::from_secs(1))
                    .set_response_timeout(ANSWER_WITHIN + NODE_GRACE);
                Conn::Cluster(
                    client.get_pending_async_connection_with_config(config),
                    ANSWER_WITHIN,
                )
            }
        })
    }

    /// A connection of its own for blocking reads of `block`, which must not count as a
    /// hung server.
    pub(crate) async fn blocking(&self, block: Duration) -> redis::RedisResult<Conn> {
        let response = block + Duration::from_secs(5);
        Ok(match self {
            Self::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(response));
                Conn::Plain(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                )
            }
            Self::Cluster(client) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(Duration::from_secs(2))
                    .set_response_timeout(response + NODE_GRACE);
                Conn::Cluster(
                    client.get_async_connection_with_config(config).await?,
                    response,
                )
            }
        })
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::Source;
    use crate::config::RedisSettings;
    use crate::store::StoreError;

    /// A server older than Redis 6 refuses `HELLO`: the operator is told which Redis is
    /// needed, not only that a command failed.
    #[tokio::test]
    async fn a_redis_without_resp3_is_named_as_too_old() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|error| panic!("bind: {error}"));
        let address = listener
            .local_addr()
            .unwrap_or_else(|error| panic!("address: {error}"));
        // Answers whatever it reads as Redis 5 answers HELLO.
        let old_redis = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    while let Ok(read) = socket.read(&mut request).await {
                        // One refusal per command read (the client pipelines HELLO with
                        // CLIENT SETINFO); each command is an array, `*` at a line's start.
                        let read = &request[..read];
                        let commands = read
                            .iter()
                            .enumerate()
                            .filter(|(at, byte)| {
                                **byte == b'*' && (*at == 0 || read[at - 1] == b'\n')
                            })
                            .count();
                        if commands == 0 {
                            break;
                        }
                        let refusal =
                            b"-ERR unknown command `HELLO`, with args beginning with: `3`, \r\n";
                        if socket.write_all(&refusal.repeat(commands)).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let settings = RedisSettings::single(format!("redis://{address}"), "gl-test");
        let mut conn = Source::open(&settings)
            .and_then(|source| source.shared())
            .unwrap_or_else(|error| panic!("client: {error}"));
        let ping = redis::cmd("PING");
        let ping = ping.query_async::<String>(&mut conn);
        let error = match tokio::time::timeout(Duration::from_secs(10), ping).await {
            Ok(Err(error)) => StoreError::from(error).to_string(),
            other => panic!("an old Redis was accepted: {other:?}"),
        };
        assert!(error.contains("Redis 6.2 or later"), "{error}");
        old_redis.abort();
    }
}
