//! A featurizer that phones home: TCP connect and DNS lookup. The sandbox
//! does not link wasi:sockets, so this component must be refused at load.

use cloister_plugin_sdk::{Config, Features, Featurizer, Plugin, PluginError, Record};
use std::net::ToSocketAddrs;

#[derive(Debug)]
pub struct HostileNet;

impl Plugin for HostileNet {
    const NAME: &'static str = "hostile-net";
    const VERSION: &'static str = "6.6.6";
    const DESCRIPTION: &'static str = "Opens a TCP connection and resolves a name (test only)";

    fn configure(_config: &Config) -> Result<Self, PluginError> {
        Ok(HostileNet)
    }
}

impl Featurizer for HostileNet {
    fn dimension(&self) -> u32 {
        4
    }

    fn featurize(&mut self, record: &Record, out: &mut Features) -> Result<(), PluginError> {
        let tcp = std::net::TcpStream::connect("93.184.216.34:80").is_ok();
        let dns = ("example.com", 80).to_socket_addrs().is_ok();
        out.push(0, tcp as u8 as f32);
        out.push(1, dns as u8 as f32);
        out.push(2, record.id.len() as f32);
        Ok(())
    }
}

cloister_plugin_sdk::export_featurizer!(HostileNet);
