//! Every Herald service plus the provider sandbox in one process, wired to each other: what
//! `heraldctl up` runs on a laptop and what the end-to-end tests start.

use std::net::SocketAddr;

use herald_amqp::Broker;
use herald_sandbox::Sandbox;
use herald_store::Store;
use herald_token::TokenService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::HeraldConfig;
use crate::demo;

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(transparent)]
    Amqp(#[from] herald_amqp::AmqpError),
    #[error(transparent)]
    Store(#[from] herald_store::StoreError),
    #[error("token service: {0}")]
    Token(#[from] herald_token::TokenError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
}

/// A running stack. Dropping it does not stop it: call [`Stack::stop`].
pub struct Stack {
    /// The configuration as wired (real listen addresses, sandbox URLs).
    pub config: HeraldConfig,
    pub sandbox: Sandbox,
    pub ingress_url: String,
    pub callback_url: String,
    pub token_url: String,
    pub sandbox_url: String,
    /// The one admin listener (`/metrics`, `/healthz`, `/readyz`) of the whole process, when
    /// `telemetry.admin_listen` is set.
    pub admin_url: Option<String>,
    shutdown: CancellationToken,
    tasks: JoinSet<(&'static str, Result<(), String>)>,
}

async fn bind(address: &str) -> Result<(TcpListener, SocketAddr), StackError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| StackError::Listen {
            address: address.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| StackError::Listen {
        address: address.to_string(),
        source,
    })?;
    Ok((listener, local))
}

/// Creates the database if needed, migrates, declares the topology and seeds the demo tenant.
pub async fn prepare(config: &HeraldConfig) -> Result<(), StackError> {
    if herald_store::ensure_database(&config.postgres.url).await? {
        tracing::info!("created the database");
    }
    let broker = Broker::connect(&config.amqp, "heraldctl").await?;
    broker.declare_topology().await?;
    let store = Store::connect(&config.postgres, &broker.topology().status_exchange()).await?;
    store.migrate().await?;
    demo::seed(&store, &demo::amqp_user(&config.amqp.url)).await?;
    broker.close().await;
    Ok(())
}

impl Stack {
    /// Prepares the infrastructure, binds every listener (port 0 picks a free one), points
    /// the services at each other and at the sandbox, and starts them all.
    pub async fn start(mut config: HeraldConfig) -> Result<Self, StackError> {
        prepare(&config).await?;

        let (sandbox_listener, sandbox_addr) = bind(&config.sandbox.listen).await?;
        let (token_listener, token_addr) = bind(&config.token.listen).await?;
        let (ingress_listener, ingress_addr) = bind(&config.ingress.listen).await?;
        let (callback_listener, callback_addr) = bind(&config.callback.listen).await?;
        // All services share one process and one metrics registry: one admin listener serves
        // them all, so the services themselves get none.
        let admin = match config.telemetry.admin_listen.take() {
            Some(address) => Some(bind(&address).await?),
            None => None,
        };
        wire(
            &mut config,
            &sandbox_addr.to_string(),
            &token_addr.to_string(),
            &ingress_addr.to_string(),
            &callback_addr.to_string(),
        );
        let sandbox_url = format!("http://{sandbox_addr}");
        let callback_url = format!("http://{callback_addr}");
        let token_url = format!("http://{token_addr}");

        let shutdown = CancellationToken::new();
        let admin_url = admin
            .as_ref()
            .map(|(_, address)| format!("http://{address}"));
        let mut tasks = JoinSet::new();
        let sandbox = Sandbox::new(config.sandbox.clone());
        {
            let (sandbox, stop) = (sandbox.clone(), shutdown.clone());
            tasks.spawn(async move {
                let result = sandbox
                    .serve(sandbox_listener, stop.cancelled_owned())
                    .await;
                ("sandbox", result.map_err(|e| e.to_string()))
            });
        }
        if let Some((listener, _)) = admin {
            let stop = shutdown.clone();
            let ready: herald_telemetry::ReadyCheck =
                std::sync::Arc::new(|| Box::pin(async { Ok(Vec::new()) }));
            tasks.spawn(async move {
                let result = herald_telemetry::serve_admin(listener, ready, stop).await;
                ("admin", result.map_err(|e| e.to_string()))
            });
        }
        let token_service = TokenService::new(config.token.clone()).await?;
        {
            let stop = shutdown.clone();
            tasks.spawn(async move {
                let result = token_service
                    .serve(token_listener, stop.cancelled_owned())
                    .await;
                ("token", result.map_err(|e| e.to_string()))
            });
        }
        let stop = shutdown.clone();
        let ingress = config.ingress();
        tasks.spawn(async move {
            let result = herald_ingress::run(ingress, ingress_listener, stop).await;
            ("ingress", result.map_err(|e| e.to_string()))
        });
        let stop = shutdown.clone();
        let callback = config.callback();
        tasks.spawn(async move {
            let result = herald_callback::run(callback, callback_listener, stop).await;
            ("callback", result.map_err(|e| e.to_string()))
        });
        if !config.external_renderer {
            let stop = shutdown.clone();
            let renderer = config.renderer();
            tasks.spawn(async move {
                let result = herald_renderer::run(renderer, stop).await;
                ("renderer", result.map_err(|e| e.to_string()))
            });
        }
        // A stack without sender channels leaves sending to workers started on their own
        // (tests run several, or stop one mid-job): see [`Stack::spawn_sender`].
        if !config.sender.channels.is_empty() {
            let stop = shutdown.clone();
            let sender = config.sender();
            tasks.spawn(async move {
                let result = herald_sender::run(sender, stop).await;
                ("sender", result.map_err(|e| e.to_string()))
            });
        }

        Ok(Self {
            config,
            sandbox,
            ingress_url: format!("http://{ingress_addr}"),
            callback_url,
            token_url,
            sandbox_url,
            admin_url,
            shutdown,
            tasks,
        })
    }

    /// Starts one more sender worker wired like the stack's (sandbox, token service, database,
    /// broker), with `customize` applied to its configuration; it runs until its own
    /// [`SenderHandle::stop`] or the stack's shutdown.
    pub fn spawn_sender(
        &self,
        customize: impl FnOnce(&mut herald_sender::SenderConfig),
    ) -> SenderHandle {
        let mut config = self.config.sender();
        if config.sender.channels.is_empty() {
            config.sender.channels = herald_contract::channels::ALL
                .iter()
                .map(|c| c.to_string())
                .collect();
        }
        customize(&mut config);
        let shutdown = self.shutdown.child_token();
        let task = tokio::spawn(herald_sender::run(config, shutdown.clone()));
        SenderHandle { shutdown, task }
    }

    /// Starts one more renderer wired like the stack's, with `customize` applied to its
    /// configuration; it runs until its own [`ServiceHandle::stop`] or the stack's shutdown.
    pub fn spawn_renderer(
        &self,
        customize: impl FnOnce(&mut herald_renderer::RendererConfig),
    ) -> ServiceHandle<herald_renderer::RendererError> {
        let mut config = self.config.renderer();
        customize(&mut config);
        let shutdown = self.shutdown.child_token();
        let task = tokio::spawn(herald_renderer::run(config, shutdown.clone()));
        ServiceHandle { shutdown, task }
    }

    /// Resolves when any service stops (with its name and error), e.g. to exit `up` loudly.
    pub async fn stopped(&mut self) -> Option<(&'static str, Result<(), String>)> {
        match self.tasks.join_next().await? {
            Ok(outcome) => Some(outcome),
            Err(e) => Some(("task", Err(e.to_string()))),
        }
    }

    /// Stops every service gracefully and waits for them.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while let Some(done) = self.tasks.join_next().await {
            if let Ok((name, Err(error))) = done {
                tracing::warn!(service = name, %error, "service ended with an error");
            }
        }
    }
}

/// A sender worker started by [`Stack::spawn_sender`].
pub type SenderHandle = ServiceHandle<herald_sender::SenderError>;

/// A service started on its own by a [`Stack`] (a sender worker, a renderer).
pub struct ServiceHandle<E> {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), E>>,
}

impl<E: std::fmt::Display> ServiceHandle<E> {
    /// SIGTERM for this service: stop consuming, drain (up to its drain timeout), close.
    pub async fn stop(self) -> Result<(), String> {
        self.shutdown.cancel();
        match self.task.await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Points the services at each other (`host:port` of each listener) and every provider account
/// configured for the local sandbox (`127.0.0.1:8099`) at the sandbox's address, and tells the
/// sandbox where to send callbacks and SMS receipts. Used by `Stack::start` and by herald-bench.
pub fn wire(config: &mut HeraldConfig, sandbox: &str, token: &str, ingress: &str, callback: &str) {
    let sandbox_url = format!("http://{sandbox}");
    let callback_url = format!("http://{callback}");
    let token_url = format!("http://{token}");
    config.sandbox.listen = sandbox.to_string();
    config.token.listen = token.to_string();
    config.ingress.listen = ingress.to_string();
    config.callback.listen = callback.to_string();
    for account in config.token.accounts.values_mut() {
        account.base_url = sandbox_url.clone();
    }
    config.sender.wechat_base_url = sandbox_url.clone();
    config.sender.wecom_base_url = sandbox_url.clone();
    for robot in config.sender.robots.values_mut() {
        if let Some(path) = robot.url.strip_prefix("http://127.0.0.1:8099") {
            robot.url = format!("{sandbox_url}{path}");
        }
    }
    for account in config.sender.sms.values_mut() {
        if account.base_url.starts_with("http://127.0.0.1:8099") {
            account.base_url = sandbox_url.clone();
        }
    }
    // The sandbox's SMS accounts push receipts to the account Herald sends them with.
    for sandbox_account in &mut config.sandbox.sms_accounts {
        let sender = config
            .sender
            .sms
            .iter()
            .find(|(_, a)| a.key_id == sandbox_account.key_id);
        if let Some((id, _)) = sender
            && let Some(receipts) = config.callback.sms.get(id)
        {
            sandbox_account.receipt_url = Some(format!(
                "{callback_url}/v1/callbacks/sms/{id}?token={}",
                receipts.token
            ));
        }
    }
    config.token_service.url = token_url;
    config.token_service.auth_token = config.token.auth_token.clone();
    for app in &mut config.sandbox.apps {
        if let Some((id, _)) = config
            .callback
            .wechat
            .iter()
            .find(|(_, a)| a.appid == app.appid)
        {
            app.callback_url = Some(format!("{callback_url}/v1/callbacks/wechat/{id}"));
        }
    }
}
