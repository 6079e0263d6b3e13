//! An IPVS table as `ipvsadm -Ln` lists it, so what portpolicy plans or reads back from the
//! kernel can be compared with what `ipvsadm` shows, line for line.

use std::fmt::Write;

use crate::ports::Protocol;

use super::table::IpvsTable;

/// The two header lines `ipvsadm -Ln` prints before the table.
pub(crate) const HEADER: &str = "Prot LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n";

/// `10.96.0.10:80`, or `[fd00::10]:80` for an IPv6 address.
pub(crate) fn socket_text(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

/// A virtual server's line: `TCP  10.96.0.10:80 rr persistent 300`.
pub(crate) fn virtual_server_line(
    protocol: Protocol,
    address: &str,
    port: u16,
    scheduler: &str,
    persistence_timeout: Option<u32>,
) -> String {
    let mut line = format!(
        "{:<4} {} {scheduler}",
        protocol.as_str(),
        socket_text(address, port)
    );
    if let Some(timeout) = persistence_timeout {
        let _ = write!(line, " persistent {timeout}");
    }
    line
}

/// A masquerading real server's line, padded as `ipvsadm` pads it (trailing blanks included).
pub(crate) fn real_server_line(address: &str, port: u16, weight: u32, active: u32, inactive: u32) -> String {
    format!(
        "  -> {:<28} {:<7} {weight:<6} {active:<10} {inactive:<10}",
        socket_text(address, port),
        "Masq"
    )
}

/// The whole table, header included, as `ipvsadm -Ln` prints it.
pub fn format_table(table: &IpvsTable) -> String {
    let mut out = String::from(HEADER);
    for (key, service) in table {
        let address = key.address.to_string();
        out.push_str(&virtual_server_line(
            key.protocol,
            &address,
            key.port,
            &service.scheduler,
            service.persistence_timeout,
        ));
        out.push('\n');
        for (real, state) in &service.real_servers {
            out.push_str(&real_server_line(
                &real.address.to_string(),
                real.port,
                state.weight,
                state.active_connections,
                state.inactive_connections,
            ));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipvs::table::test_keys::vs_key;
    use crate::ipvs::{IpvsService, RealServerKey, RealServerState};

    #[test]
    fn table_prints_like_ipvsadm_ln() {
        let mut table = IpvsTable::new();
        let mut service = IpvsService {
            scheduler: "rr".into(),
            persistence_timeout: Some(300),
            ..Default::default()
        };
        service.real_servers.insert(
            RealServerKey {
                address: "10.0.1.2".parse().unwrap(),
                port: 8080,
            },
            RealServerState::with_weight(1),
        );
        table.insert(vs_key("10.96.0.10", 80, Protocol::Tcp), service);
        let text = format_table(&table);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[2], "TCP  10.96.0.10:80 rr persistent 300");
        assert_eq!(
            lines[3],
            "  -> 10.0.1.2:8080                Masq    1      0          0         "
        );
        assert_eq!(socket_text("fd00::1", 53), "[fd00::1]:53");
    }
}
