//! The configuration each system gets: mesh's Istio rules and the Envoy, nginx and HAProxy
//! files with the same 80/20 split, upstream keep-alive and access log on or off.

use super::*;

pub(super) fn mesh_rules() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [{HOST}]
  addresses: [{VIP}]
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: {BACKEND_PORT}}}
  resolution: STATIC
  endpoints:
  - {{address: {a}, labels: {{version: a}}}}
  - {{address: {b}, labels: {{version: b}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web}}
spec:
  host: {HOST}
  subsets:
  - {{name: a, labels: {{version: a}}}}
  - {{name: b, labels: {{version: b}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web}}
spec:
  hosts: [{HOST}]
  http:
  - timeout: 10s
    route:
    - {{destination: {{host: {HOST}, subset: a}}, weight: 80}}
    - {{destination: {{host: {HOST}, subset: b}}, weight: 20}}
",
        a = backend_v4(1),
        b = backend_v4(2)
    )
}

pub(super) fn envoy_config(access_log: Option<&Path>) -> String {
    let log = match access_log {
        Some(p) => format!(
            "          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
",
            p.display()
        ),
        None => String::new(),
    };
    let cluster = |name: &str, ip: std::net::IpAddr| {
        format!(
            "  - name: {name}
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {BACKEND_PORT}}}}}}}
"
        )
    };
    format!(
        "static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: {NODE_V4}, port_value: {PEER_PORT}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
{log}          route_config:
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes:
              - match: {{prefix: /}}
                route:
                  timeout: 10s
                  weighted_clusters:
                    clusters:
                    - {{name: a, weight: 80}}
                    - {{name: b, weight: 20}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{}{}",
        cluster("a", backend_v4(1)),
        cluster("b", backend_v4(2))
    )
}

pub(super) fn nginx_config(dir: &Path, log: bool, workers: usize) -> String {
    let d = dir.display();
    let access_log = if log {
        format!("access_log {d}/access.log;")
    } else {
        "access_log off;".to_string()
    };
    format!(
        "user root;
daemon off;
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  {access_log}
  client_body_temp_path {d}/nginx-body;
  proxy_temp_path {d}/nginx-proxy;
  keepalive_requests 1000000;
  upstream backends {{
    server {a}:{BACKEND_PORT} weight=4;
    server {b}:{BACKEND_PORT} weight=1;
    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen {NODE_V4}:{PEER_PORT} backlog=4096;
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_read_timeout 10s;
    }}
  }}
}}
",
        a = backend_v4(1),
        b = backend_v4(2)
    )
}

pub(super) fn haproxy_config(log: bool, threads: usize) -> String {
    let (global_log, defaults_log) = if log {
        (
            "  log stdout format raw local0\n",
            "  log global\n  option httplog\n",
        )
    } else {
        ("", "")
    };
    format!(
        "global
  nbthread {threads}
  maxconn 4000
{global_log}defaults
{defaults_log}  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 10s
  timeout http-keep-alive 30s
frontend bench
  bind {NODE_V4}:{PEER_PORT}
  default_backend backends
backend backends
  balance roundrobin
  http-reuse always
  server a {a}:{BACKEND_PORT} weight 80
  server b {b}:{BACKEND_PORT} weight 20
",
        a = backend_v4(1),
        b = backend_v4(2)
    )
}
