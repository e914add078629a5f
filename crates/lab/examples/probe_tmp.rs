#![allow(clippy::unwrap_used, missing_docs)]
use dnsfence_lab::*;
fn main() {
    let lab = Lab::builder().pods(1).build().unwrap();
    let pod = lab.pod(0);
    let t = std::time::Instant::now();
    println!("{}", pod.reach_tcp("[2001:db8::20]:80".parse().unwrap()));
    println!("{}", pod.reach_tcp("[2001:db8::20]:81".parse().unwrap()));
    println!("{}", pod.reach_tcp("[2001:db8::20]:82".parse().unwrap()));
    let _ = t;
    lab.node().exec("nft", ["add table inet lab; add chain inet lab filt { type filter hook forward priority 0; }; add rule inet lab filt ip6 daddr 2001:db8::20 counter reject with icmpx admin-prohibited"]).unwrap();
    let _ = lab.node().exec("nstat", ["-n"]);
    let _ = pod.netns().exec("nstat", ["-n"]);
    println!("{}", pod.reach_tcp("[2001:db8::20]:80".parse().unwrap()));
    println!(
        "node: {}",
        String::from_utf8_lossy(&lab.node().exec("nstat", ["-a"]).unwrap().stdout)
    );
    println!(
        "pod: {}",
        String::from_utf8_lossy(&pod.netns().exec("nstat", ["-a"]).unwrap().stdout)
    );
    println!(
        "{}",
        String::from_utf8_lossy(&lab.node().exec("nft", ["list ruleset"]).unwrap().stdout)
    );
}
