//! A private RabbitMQ node, Postgres cluster and Redis server for one test, on free ports and
//! under a temporary directory of their own, so the test may kill and restart them without
//! touching the machine's shared ones (`../shared/TOOLS.md`, "A private broker, database or
//! cache for fault tests"). Everything is killed and the directory removed on drop, also when
//! the test panics (set `HERALD_FAULT_KEEP=1` to keep the directory and its logs).
//!
//! Also [`ServiceProcess`]: one Herald service as a child process the test can SIGKILL.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A port that was free a moment ago (bound on 127.0.0.1 and released). Ports come from the
/// kernel's ephemeral range, so two test binaries running at once do not pick the same one.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port on 127.0.0.1")
}

/// A temporary directory, removed on drop unless `HERALD_FAULT_KEEP` is set.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let path = std::env::temp_dir().join(format!("{prefix}-{}", &id[..12]));
        std::fs::create_dir_all(&path).expect("create the temporary directory");
        Self { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("HERALD_FAULT_KEEP").is_some() {
            eprintln!("kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn log_file(path: &Path) -> (Stdio, Stdio) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open a log file");
    let copy = file.try_clone().expect("clone the log file handle");
    (Stdio::from(file), Stdio::from(copy))
}

/// SIGKILL for a whole process group (the broker's start script, beam and its helpers).
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-9", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

fn run(command: &mut Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A RabbitMQ node of its own (node name, ports, mnesia, logs, Erlang cookie).
pub struct PrivateRabbit {
    pub port: u16,
    dist_port: u16,
    epmd_port: u16,
    node: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRabbit {
    /// Prepares the node's directory and starts it (not waiting for it: see [`Self::wait_ready`]).
    pub fn start(dir: &Path) -> Self {
        let dir = dir.join("rabbitmq");
        std::fs::create_dir_all(dir.join("mnesia")).expect("rabbitmq dir");
        std::fs::create_dir_all(dir.join("log")).expect("rabbitmq log dir");
        // No disk alarm on a busy CI disk; everything else is the default.
        std::fs::write(
            dir.join("rabbitmq.conf"),
            "disk_free_limit.absolute = 10MB\n",
        )
        .expect("rabbitmq.conf");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("enabled_plugins");
        std::fs::write(dir.join("rabbitmq-env.conf"), "").expect("rabbitmq-env.conf");
        let id = dir
            .parent()
            .and_then(Path::file_name)
            .map(|n| {
                n.to_string_lossy()
                    .replace(|c: char| !c.is_alphanumeric(), "")
            })
            .unwrap_or_default();
        let mut rabbit = Self {
            port: free_port(),
            dist_port: free_port(),
            epmd_port: free_port(),
            node: format!("{id}@localhost"),
            dir,
            child: None,
        };
        rabbit.spawn();
        rabbit
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn spawn(&mut self) {
        let (out, err) = log_file(&self.dir.join("console.log"));
        let child = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server")
            .env("HOME", &self.dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_PID_FILE", self.dir.join("rabbit.pid"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                self.dir.join("advanced.config"),
            )
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env_remove("ERL_FLAGS")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group, so a kill reaches beam and its helpers too.
            .process_group(0)
            .spawn()
            .expect("start rabbitmq-server");
        self.child = Some(child);
    }

    /// Waits until the node accepts AMQP connections.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let url = self.url();
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                herald_amqp::lapin::Connection::connect(&url, Default::default()),
            )
            .await;
            if let Ok(Ok(connection)) = attempt {
                let _ = connection.close(200, "OK".into()).await;
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the private RabbitMQ did not start within {timeout:?} (logs in {})",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `kill -9` of the node (durable queues keep their contents on disk).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
        }
    }

    /// Starts the node again after [`Self::kill`] and waits until it accepts connections.
    pub async fn restart(&mut self, timeout: Duration) {
        self.kill();
        self.spawn();
        self.wait_ready(timeout).await;
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        self.kill();
        // The node's epmd daemonised itself out of the process group.
        let _ = Command::new("epmd")
            .args(["-port", &self.epmd_port.to_string(), "-kill"])
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A Postgres cluster of its own (trust auth, superuser `postgres`).
pub struct PrivatePostgres {
    pub port: u16,
    data: PathBuf,
    as_postgres: bool,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl PrivatePostgres {
    /// initdb and start; blocking (a few seconds).
    pub fn start(dir: &Path) -> Self {
        let data = dir.join("postgres");
        std::fs::create_dir_all(&data).expect("postgres dir");
        // initdb refuses to run as root: the cluster belongs to the postgres user then.
        let as_postgres = is_root();
        if as_postgres {
            run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&data),
                "chown the postgres dir",
            );
        }
        let pg = Self {
            port: free_port(),
            data,
            as_postgres,
        };
        pg.pg(
            &format!(
                "{PG_BIN}/initdb -D {} -U postgres --auth=trust --no-sync -E UTF8",
                pg.data.display()
            ),
            "initdb",
        );
        pg.start_server();
        pg
    }

    fn pg(&self, command: &str, what: &str) {
        if self.as_postgres {
            run(Command::new("su").args(["postgres", "-c", command]), what);
        } else {
            run(Command::new("sh").args(["-c", command]), what);
        }
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn start_server(&self) {
        // fsync off: only the server process is ever killed, never the machine, so the
        // kernel's page cache keeps every write and crash recovery still has them.
        self.pg(
            &format!(
                "{PG_BIN}/pg_ctl -D {dir} -l {dir}/server.log -w -t 60 \
                 -o '-p {port} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c max_connections=200' start",
                dir = self.data.display(),
                port = self.port
            ),
            "pg_ctl start",
        );
    }

    /// Stops the server the hard way (`immediate`: no checkpoint, crash recovery on start).
    pub fn kill(&self) {
        self.pg(
            &format!(
                "{PG_BIN}/pg_ctl -D {} -m immediate -w stop",
                self.data.display()
            ),
            "pg_ctl stop",
        );
    }

    /// Starts the server again after [`Self::kill`].
    pub fn restart(&self) {
        self.start_server();
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let command = format!(
            "{PG_BIN}/pg_ctl -D {} -m immediate -w stop",
            self.data.display()
        );
        let _ = if self.as_postgres {
            Command::new("su")
                .args(["postgres", "-c", &command])
                .output()
        } else {
            Command::new("sh").args(["-c", &command]).output()
        };
    }
}

/// A Redis server of its own, nothing on disk.
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    pub fn start(dir: &Path) -> Self {
        let mut redis = Self {
            port: free_port(),
            dir: dir.to_path_buf(),
            child: None,
        };
        redis.spawn();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn spawn(&mut self) {
        let (out, err) = log_file(&self.dir.join("redis.log"));
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
    }

    /// Waits until the server answers PING.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let pong = async {
                let client = redis::Client::open(self.url().as_str()).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .ok()
            };
            if tokio::time::timeout(Duration::from_secs(2), pong)
                .await
                .ok()
                .flatten()
                .is_some()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the private Redis did not start within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL (nothing is persisted: the keys are gone).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self, timeout: Duration) {
        self.kill();
        self.spawn();
        self.wait_ready(timeout).await;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The three, started in parallel (RabbitMQ dominates: 10–15 s).
pub struct PrivateInfra {
    // Field order is drop order: the servers go before their directory.
    pub rabbit: PrivateRabbit,
    pub postgres: PrivatePostgres,
    pub redis: PrivateRedis,
    pub dir: TempDir,
}

impl PrivateInfra {
    pub async fn start() -> Self {
        let dir = TempDir::new("herald-fault");
        let rabbit = PrivateRabbit::start(&dir.path);
        let redis = PrivateRedis::start(&dir.path);
        let pg_dir = dir.path.clone();
        let postgres = tokio::task::spawn_blocking(move || PrivatePostgres::start(&pg_dir));
        rabbit.wait_ready(Duration::from_secs(90)).await;
        redis.wait_ready(Duration::from_secs(20)).await;
        let postgres = postgres.await.expect("postgres starts");
        Self {
            rabbit,
            postgres,
            redis,
            dir,
        }
    }
}

/// One Herald service as a child process (`herald-fault-service <name> <config>`), logging to
/// `<dir>/<name>.log`.
pub struct ServiceProcess {
    pub name: &'static str,
    exe: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Times the process ended without being killed by the test (and was started again).
    pub unplanned_exits: usize,
}

impl ServiceProcess {
    pub fn start(exe: &Path, name: &'static str, config: &Path, dir: &Path) -> Self {
        let mut process = Self {
            name,
            exe: exe.to_path_buf(),
            config: config.to_path_buf(),
            log: dir.join(format!("{name}.log")),
            child: None,
            unplanned_exits: 0,
        };
        process.spawn();
        process
    }

    fn spawn(&mut self) {
        let (out, err) = log_file(&self.log);
        let child = Command::new(&self.exe)
            .arg(self.name)
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start herald-fault-service");
        self.child = Some(child);
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// What an orchestrator does (`restartPolicy: Always`): a process that ended on its own is
    /// started again and counted. Answers whether it had ended.
    pub fn restart_if_exited(&mut self) -> bool {
        let exited = match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(_))) | Some(Err(_)) | None => true,
            Some(Ok(None)) => false,
        };
        if exited {
            self.unplanned_exits += 1;
            self.child = None;
            self.spawn();
        }
        exited
    }

    /// The last lines of its log, for a failure message.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
