//! Where the store's connections come from: a plain deadpool-redis pool or, for a Sentinel URL, one
//! that asks the sentinels for the current primary on every new connection.

use super::{Result, StoreError};
use deadpool_redis::{Manager, Pool, Runtime};
use farm_proto::redis_url::Target;
use redis::aio::MultiplexedConnection;
use std::time::Duration;

#[derive(Clone)]
pub(super) enum Pools {
    Direct(Pool),
    Sentinel(deadpool_redis::sentinel::Pool),
}

impl Pools {
    /// A pool of at most 4 connections, every step bounded by `timeout`.
    pub(super) fn new(target: &Target, timeout: Duration) -> Result<Self> {
        // redis-rs defaults to a 500ms response timeout; the farm's own bound applies instead.
        let conn_cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let build_err = |e: deadpool_redis::BuildError| StoreError::Pool(e.to_string());
        Ok(match target {
            Target::Direct { url } => {
                let manager = Manager::new_with_config(url.as_str(), conn_cfg)?;
                Pools::Direct(
                    Pool::builder(manager)
                        .max_size(4)
                        .runtime(Runtime::Tokio1)
                        .wait_timeout(Some(timeout))
                        .create_timeout(Some(timeout))
                        .recycle_timeout(Some(timeout))
                        .build()
                        .map_err(build_err)?,
                )
            }
            Target::Sentinel {
                sentinels,
                master,
                username,
                password,
                db,
            } => {
                use deadpool_redis::sentinel as ds;
                let info = ds::SentinelNodeConnectionInfo {
                    tls_mode: None,
                    redis_connection_info: Some(deadpool_redis::RedisConnectionInfo {
                        db: *db,
                        username: username.clone(),
                        password: password.clone(),
                        protocol: Default::default(),
                    }),
                };
                let manager = ds::Manager::new(
                    sentinels.clone(),
                    master.clone(),
                    Some(info),
                    ds::SentinelServerType::Master,
                )?;
                Pools::Sentinel(
                    ds::Pool::builder(manager)
                        .max_size(4)
                        .runtime(Runtime::Tokio1)
                        .wait_timeout(Some(timeout))
                        .create_timeout(Some(timeout))
                        .recycle_timeout(Some(timeout))
                        .build()
                        .map_err(build_err)?,
                )
            }
        })
    }

    /// A connection taken out of the pool for good (the store keeps it as its hot connection).
    pub(super) async fn take(&self) -> Result<MultiplexedConnection> {
        let pool_err = |e: deadpool_redis::PoolError| StoreError::Pool(e.to_string());
        Ok(match self {
            Pools::Direct(p) => deadpool_redis::Connection::take(p.get().await.map_err(pool_err)?),
            Pools::Sentinel(p) => {
                deadpool_redis::sentinel::Connection::take(p.get().await.map_err(pool_err)?)
            }
        })
    }
}
