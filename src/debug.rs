//! `portpolicy debug ...`: operator tools that talk to the kernel directly, and the e2e suite's
//! way to drive [`IpvsHandle`] and [`DummyLink`] from a shell.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Subcommand;

use portpolicy_core::ipvs::listing::format_table;
use portpolicy_core::ipvs::{IpvsOp, RealServerKey, StaleFlows, VirtualServerKey};
use portpolicy_core::ports::Protocol;
use portpolicy_netlink::conntrack::FlowFilter;
use portpolicy_netlink::{ConntrackHandle, DummyLink, IpvsHandle, NetlinkError};

#[derive(Subcommand, Debug)]
pub enum DebugCommand {
    /// Print the kernel's IPVS table the way `ipvsadm -Ln` does.
    IpvsDump,
    /// Apply IPVS operations from a file ('-' for stdin), one per line:
    /// `add-service TCP 10.96.0.10:80 rr [persistent SECONDS]`, `update-service ...`,
    /// `delete-service TCP 10.96.0.10:80`, `add-real TCP 10.96.0.10:80 10.0.1.2:8080 WEIGHT`,
    /// `update-real ... WEIGHT`, `delete-real TCP 10.96.0.10:80 10.0.1.2:8080`.
    IpvsApply { file: PathBuf },
    /// Time programming N virtual servers with N*M real servers from an empty table, then one
    /// real-server change; removes what it made.
    IpvsBench {
        #[arg(long)]
        services: u32,
        #[arg(long, default_value_t = 5)]
        reals_per_service: u32,
        /// Only write the same rules in `ipvsadm -R` syntax to this file, for a comparison.
        #[arg(long)]
        write_ipvsadm_rules: Option<PathBuf>,
    },
    /// Wait until the kernel lists REAL as a real server of SERVICE (any weight), asking it over
    /// netlink every INTERVAL from one process, so that watching for a change costs the machine
    /// little (the system e2e's watch-latency benchmark). Prints `polls N elapsed_ms MS`, N
    /// being the looks that did not find it; fails after TIMEOUT.
    IpvsWait {
        #[arg(value_parser = parse_protocol)]
        protocol: Protocol,
        service: SocketAddr,
        real: SocketAddr,
        #[arg(long, default_value_t = 5)]
        interval_ms: u64,
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
    },
    /// Ensure the dummy interface and make it hold exactly the given addresses.
    DummySync {
        #[arg(long, default_value = portpolicy_netlink::link::DEFAULT_NAME)]
        name: String,
        addresses: Vec<IpAddr>,
    },
    /// Delete the connection-tracking entries the agent deletes for a removed UDP real server:
    /// flows of PROTOCOL sent to SERVICE (address:port) whose replies come from REAL, or from
    /// anywhere without REAL. Prints how many were deleted.
    ConntrackClear {
        #[arg(value_parser = parse_protocol)]
        protocol: Protocol,
        service: SocketAddr,
        real: Option<SocketAddr>,
    },
    /// Answer every UDP datagram on ADDRESS with REPLY, until killed (a test backend).
    UdpEcho { listen: SocketAddr, reply: String },
    /// Send COUNT datagrams to ADDRESS from one source address and port, as a resolver keeps
    /// one socket, and print one line per probe: milliseconds since the first, then the answer
    /// or `timeout`.
    UdpProbe {
        to: SocketAddr,
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long, default_value_t = 10)]
        count: u32,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long, default_value_t = 200)]
        timeout_ms: u64,
    },
}

impl DebugCommand {
    pub fn run(self) -> ExitCode {
        let result = match self {
            DebugCommand::IpvsDump => ipvs_dump(),
            DebugCommand::IpvsApply { file } => ipvs_apply(&file),
            DebugCommand::IpvsBench {
                services,
                reals_per_service,
                write_ipvsadm_rules: Some(path),
            } => std::fs::write(&path, ipvsadm_rules(&bench_ops(services, reals_per_service)))
                .map_err(|e| format!("writing {}: {e}", path.display())),
            DebugCommand::IpvsBench {
                services,
                reals_per_service,
                write_ipvsadm_rules: None,
            } => ipvs_bench(services, reals_per_service),
            DebugCommand::IpvsWait {
                protocol,
                service,
                real,
                interval_ms,
                timeout_ms,
            } => ipvs_wait(
                protocol,
                service,
                real,
                Duration::from_millis(interval_ms),
                Duration::from_millis(timeout_ms),
            ),
            DebugCommand::DummySync { name, addresses } => dummy_sync(&name, addresses),
            DebugCommand::ConntrackClear {
                protocol,
                service,
                real,
            } => conntrack_clear(protocol, service, real),
            DebugCommand::UdpEcho { listen, reply } => udp_echo(listen, &reply),
            DebugCommand::UdpProbe {
                to,
                bind,
                count,
                interval_ms,
                timeout_ms,
            } => udp_probe(
                to,
                bind,
                count,
                Duration::from_millis(interval_ms),
                Duration::from_millis(timeout_ms),
            ),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("error: {message}");
                ExitCode::FAILURE
            }
        }
    }
}

fn parse_protocol(text: &str) -> Result<Protocol, String> {
    Protocol::from_k8s(Some(&text.to_ascii_uppercase()))
}

fn conntrack_clear(protocol: Protocol, service: SocketAddr, real: Option<SocketAddr>) -> Result<(), String> {
    let key = |s: SocketAddr| VirtualServerKey {
        address: s.ip(),
        port: s.port(),
        protocol,
    };
    let flows = StaleFlows {
        service: key(service),
        real: real.map(|r| RealServerKey {
            address: r.ip(),
            port: r.port(),
        }),
    };
    let mut handle = ConntrackHandle::open().map_err(|e| e.to_string())?;
    let deleted = handle
        .delete_matching(&FlowFilter::new([&flows]))
        .map_err(|e| e.to_string())?;
    println!("deleted {deleted}");
    Ok(())
}

fn udp_echo(listen: SocketAddr, reply: &str) -> Result<(), String> {
    let socket = UdpSocket::bind(listen).map_err(|e| format!("binding {listen}: {e}"))?;
    let mut buf = [0u8; 1500];
    loop {
        let (_, peer) = socket
            .recv_from(&mut buf)
            .map_err(|e| format!("receiving: {e}"))?;
        // A peer gone away is its problem; keep answering the others.
        let _ = socket.send_to(reply.as_bytes(), peer);
    }
}

fn udp_probe(
    to: SocketAddr,
    bind: SocketAddr,
    count: u32,
    interval: Duration,
    timeout: Duration,
) -> Result<(), String> {
    let socket = UdpSocket::bind(bind).map_err(|e| format!("binding {bind}: {e}"))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut buf = [0u8; 1500];
    for probe in 0..count {
        let sent = Instant::now();
        let answer = match socket.send_to(format!("probe {probe}").as_bytes(), to) {
            Err(e) => format!("send failed: {e}"),
            Ok(_) => loop {
                match socket.recv_from(&mut buf) {
                    // Late answers to an earlier probe would be counted twice; only the one
                    // peer is asked, so any answer is this probe's.
                    Ok((len, _)) => break String::from_utf8_lossy(&buf[..len]).into_owned(),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        break "timeout".to_string();
                    }
                    Err(e) => break format!("error: {e}"),
                }
            },
        };
        println!("{} {answer}", started.elapsed().as_millis());
        if let Some(rest) = interval.checked_sub(sent.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    Ok(())
}

fn ipvs_dump() -> Result<(), String> {
    let mut handle = IpvsHandle::open().map_err(|e| e.to_string())?;
    let info = handle.info().map_err(|e| e.to_string())?;
    let table = handle.dump().map_err(|e| e.to_string())?;
    print!("{info}\n{}", format_table(&table));
    Ok(())
}

fn ipvs_wait(
    protocol: Protocol,
    service: SocketAddr,
    real: SocketAddr,
    interval: Duration,
    timeout: Duration,
) -> Result<(), String> {
    let key = VirtualServerKey {
        address: service.ip(),
        port: service.port(),
        protocol,
    };
    let wanted = RealServerKey {
        address: real.ip(),
        port: real.port(),
    };
    let mut handle = IpvsHandle::open().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut polls = 0u64;
    loop {
        let reals = handle.real_servers(&key).map_err(|e| e.to_string())?;
        if reals.contains_key(&wanted) {
            println!("polls {polls} elapsed_ms {}", started.elapsed().as_millis());
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(format!("{wanted} not a real server of {key} after {polls} looks"));
        }
        polls += 1;
        std::thread::sleep(interval);
    }
}

fn ipvs_apply(file: &std::path::Path) -> Result<(), String> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("reading stdin: {e}"))?
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))?
    };
    let ops = parse_ops(&text)?;
    let mut handle = IpvsHandle::open().map_err(|e| e.to_string())?;
    let outcome = handle.apply(&ops);
    println!("applied {} of {} operations", outcome.applied, ops.len());
    for (_, err) in &outcome.failed {
        match err {
            NetlinkError::Kernel { rule, name, .. } => println!("failed {name}: {rule}"),
            other => println!("failed: {other}"),
        }
    }
    if outcome.failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{} operations failed", outcome.failed.len()))
    }
}

fn dummy_sync(name: &str, addresses: Vec<IpAddr>) -> Result<(), String> {
    let mut link = DummyLink::ensure(name).map_err(|e| e.to_string())?;
    let desired: BTreeSet<IpAddr> = addresses.into_iter().collect();
    let (added, removed) = link.sync_addresses(&desired).map_err(|e| e.to_string())?;
    println!("{name}: added {added}, removed {removed}");
    for address in link.addresses().map_err(|e| e.to_string())? {
        println!("{address}");
    }
    Ok(())
}

/// Parses the line format of `debug ipvs-apply`; `#` starts a comment.
pub(crate) fn parse_ops(text: &str) -> Result<Vec<IpvsOp>, String> {
    let mut ops = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let op = parse_op(line).map_err(|e| format!("line {}: {e}: {line:?}", number + 1))?;
        ops.push(op);
    }
    Ok(ops)
}

fn parse_op(line: &str) -> Result<IpvsOp, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let service = || -> Result<VirtualServerKey, String> {
        let protocol = Protocol::from_k8s(words.get(1).copied()).map_err(|e| e.to_string())?;
        let socket = parse_socket(words.get(2))?;
        Ok(VirtualServerKey {
            address: socket.ip(),
            port: socket.port(),
            protocol,
        })
    };
    let real = || -> Result<RealServerKey, String> {
        let socket = parse_socket(words.get(3))?;
        Ok(RealServerKey {
            address: socket.ip(),
            port: socket.port(),
        })
    };
    let weight = || -> Result<u32, String> {
        words
            .get(4)
            .ok_or("missing weight")?
            .parse()
            .map_err(|_| "weight is not a number".to_string())
    };
    let settings = || -> Result<(String, Option<u32>), String> {
        let scheduler = words.get(3).ok_or("missing scheduler")?.to_string();
        let persistence = match (words.get(4), words.get(5)) {
            (None, _) => None,
            (Some(&"persistent"), Some(seconds)) => Some(
                seconds
                    .parse()
                    .map_err(|_| "persistence timeout is not a number")?,
            ),
            _ => return Err("expected `persistent SECONDS` after the scheduler".into()),
        };
        Ok((scheduler, persistence))
    };
    match words[0] {
        "add-service" | "update-service" => {
            let (scheduler, persistence_timeout) = settings()?;
            let key = service()?;
            Ok(if words[0] == "add-service" {
                IpvsOp::AddService {
                    key,
                    scheduler: scheduler.into(),
                    persistence_timeout,
                }
            } else {
                IpvsOp::UpdateService {
                    key,
                    scheduler: scheduler.into(),
                    persistence_timeout,
                }
            })
        }
        "delete-service" => Ok(IpvsOp::DeleteService { key: service()? }),
        "add-real" => Ok(IpvsOp::AddRealServer {
            service: service()?,
            real: real()?,
            weight: weight()?,
        }),
        "update-real" => Ok(IpvsOp::UpdateRealServer {
            service: service()?,
            real: real()?,
            weight: weight()?,
        }),
        "delete-real" => Ok(IpvsOp::DeleteRealServer {
            service: service()?,
            real: real()?,
        }),
        other => Err(format!("unknown operation {other:?}")),
    }
}

fn parse_socket(word: Option<&&str>) -> Result<SocketAddr, String> {
    let word = word.ok_or("missing ADDRESS:PORT")?;
    word.parse()
        .map_err(|_| format!("{word:?} is not ADDRESS:PORT ([ADDRESS]:PORT for IPv6)"))
}

/// The benchmark's table, in the order it is programmed: each service, then its real servers.
/// Virtual IPs count up from 10.96.0.0, real servers from 10.128.0.0, so up to millions fit.
pub(crate) fn bench_ops(services: u32, reals_per_service: u32) -> Vec<IpvsOp> {
    let mut ops = Vec::with_capacity((services * (reals_per_service + 1)) as usize);
    for s in 0..services {
        let key = bench_service(s);
        ops.push(IpvsOp::AddService {
            key,
            scheduler: "rr".into(),
            persistence_timeout: None,
        });
        for r in 0..reals_per_service {
            ops.push(IpvsOp::AddRealServer {
                service: key,
                real: bench_real(s * reals_per_service + r),
                weight: 1,
            });
        }
    }
    ops
}

fn bench_service(index: u32) -> VirtualServerKey {
    VirtualServerKey {
        address: IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + index)),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn bench_real(index: u32) -> RealServerKey {
    RealServerKey {
        address: IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + index)),
        port: 8080,
    }
}

/// The same operations as an `ipvsadm -R` restore file (adds only).
pub(crate) fn ipvsadm_rules(ops: &[IpvsOp]) -> String {
    let flag = |key: &VirtualServerKey| match key.protocol {
        Protocol::Tcp => "-t",
        Protocol::Udp => "-u",
        Protocol::Sctp => "--sctp-service",
    };
    let mut out = String::new();
    for op in ops {
        match op {
            IpvsOp::AddService {
                key,
                scheduler,
                persistence_timeout,
            } => {
                let _ = write!(
                    out,
                    "-A {} {}:{} -s {scheduler}",
                    flag(key),
                    key.address,
                    key.port
                );
                if let Some(timeout) = persistence_timeout {
                    let _ = write!(out, " -p {timeout}");
                }
                out.push('\n');
            }
            IpvsOp::AddRealServer {
                service,
                real,
                weight,
            } => {
                let _ = writeln!(
                    out,
                    "-a {} {}:{} -r {}:{} -m -w {weight}",
                    flag(service),
                    service.address,
                    service.port,
                    real.address,
                    real.port
                );
            }
            _ => {}
        }
    }
    out
}

fn ipvs_bench(services: u32, reals_per_service: u32) -> Result<(), String> {
    if services == 0 || reals_per_service == 0 {
        return Err("--services and --reals-per-service must be at least 1".into());
    }
    let mut handle = IpvsHandle::open().map_err(|e| e.to_string())?;
    let existing = handle.dump().map_err(|e| e.to_string())?;
    if !existing.is_empty() {
        return Err(format!(
            "the IPVS table already holds {} services; the benchmark starts from an empty table",
            existing.len()
        ));
    }
    let ops = bench_ops(services, reals_per_service);
    let started = Instant::now();
    let outcome = handle.apply(&ops);
    let program = started.elapsed();
    if let Some((_, err)) = outcome.failed.first() {
        cleanup(&mut handle, services);
        return Err(format!(
            "{} of {} operations failed, first: {err}",
            outcome.failed.len(),
            ops.len()
        ));
    }
    println!(
        "bench program: {services} services + {} real servers ({} ops) in {:.3} s ({:.0} ops/s)",
        services * reals_per_service,
        ops.len(),
        program.as_secs_f64(),
        ops.len() as f64 / program.as_secs_f64()
    );

    let started = Instant::now();
    let table = handle.dump().map_err(|e| e.to_string())?;
    let dump = started.elapsed();
    let reals: usize = table.values().map(|s| s.real_servers.len()).sum();
    println!(
        "bench dump: {} services + {reals} real servers read in {:.3} s",
        table.len(),
        dump.as_secs_f64()
    );
    if table.len() != services as usize || reals != (services * reals_per_service) as usize {
        cleanup(&mut handle, services);
        return Err("the dump does not hold what was programmed".into());
    }

    // One real-server change, as an endpoint update would cause: a weight flip, repeated to
    // see the spread.
    let mut changes: Vec<Duration> = Vec::new();
    for round in 0..21u32 {
        let s = round * 7919 % services;
        let op = IpvsOp::UpdateRealServer {
            service: bench_service(s),
            real: bench_real(s * reals_per_service),
            weight: 2 + round % 2,
        };
        let started = Instant::now();
        let outcome = handle.apply(std::slice::from_ref(&op));
        changes.push(started.elapsed());
        if let Some((_, err)) = outcome.failed.first() {
            cleanup(&mut handle, services);
            return Err(format!("single change failed: {err}"));
        }
    }
    let first = changes[0];
    changes.sort();
    println!(
        "bench change: one real-server change in {:.3} ms (median {:.3} ms, max {:.3} ms over {} changes)",
        first.as_secs_f64() * 1e3,
        changes[changes.len() / 2].as_secs_f64() * 1e3,
        changes[changes.len() - 1].as_secs_f64() * 1e3,
        changes.len()
    );

    let started = Instant::now();
    let left = cleanup(&mut handle, services);
    println!(
        "bench cleanup: {services} services deleted in {:.3} s",
        started.elapsed().as_secs_f64()
    );
    if left > 0 {
        return Err(format!("{left} services could not be deleted"));
    }
    Ok(())
}

/// Deletes the benchmark's services (which takes their real servers along); returns how many failed.
fn cleanup(handle: &mut IpvsHandle, services: u32) -> usize {
    let ops: Vec<IpvsOp> = (0..services)
        .map(|s| IpvsOp::DeleteService {
            key: bench_service(s),
        })
        .collect();
    handle.apply(&ops).failed.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_operation_kind() {
        let ops = parse_ops(
            "# comment\n\
             add-service TCP 10.96.0.10:80 rr\n\
             add-service UDP [fd00::10]:53 wrr persistent 600\n\
             add-real TCP 10.96.0.10:80 10.0.1.2:8080 3\n\
             update-real TCP 10.96.0.10:80 10.0.1.2:8080 0\n\
             delete-real TCP 10.96.0.10:80 10.0.1.2:8080\n\
             update-service SCTP 10.96.0.11:9 sh\n\
             delete-service TCP 10.96.0.10:80\n",
        )
        .unwrap();
        let kinds: Vec<&str> = ops.iter().map(IpvsOp::kind).collect();
        assert_eq!(
            kinds,
            vec![
                "add_service",
                "add_service",
                "add_real_server",
                "update_real_server",
                "delete_real_server",
                "update_service",
                "delete_service"
            ]
        );
        assert_eq!(
            ops[1],
            IpvsOp::AddService {
                key: VirtualServerKey {
                    address: "fd00::10".parse().unwrap(),
                    port: 53,
                    protocol: Protocol::Udp
                },
                scheduler: "wrr".into(),
                persistence_timeout: Some(600)
            }
        );
    }

    #[test]
    fn bad_lines_name_their_line() {
        let err = parse_ops("add-service TCP 10.96.0.10:80 rr\nadd-real TCP 10.96.0.10 10.0.1.2:1 1\n")
            .unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        assert!(parse_ops("frobnicate TCP 1.2.3.4:5\n").is_err());
    }

    #[test]
    fn bench_rules_match_ipvsadm_restore_syntax() {
        let ops = bench_ops(2, 2);
        assert_eq!(ops.len(), 6);
        assert_eq!(
            ipvsadm_rules(&ops),
            "-A -t 10.96.0.0:80 -s rr\n\
             -a -t 10.96.0.0:80 -r 10.128.0.0:8080 -m -w 1\n\
             -a -t 10.96.0.0:80 -r 10.128.0.1:8080 -m -w 1\n\
             -A -t 10.96.0.1:80 -s rr\n\
             -a -t 10.96.0.1:80 -r 10.128.0.2:8080 -m -w 1\n\
             -a -t 10.96.0.1:80 -r 10.128.0.3:8080 -m -w 1\n"
        );
    }
}
