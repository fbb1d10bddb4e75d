//! lb6 packet by packet (BPF_PROG_TEST_RUN). The packets are built and checked by
//! `support::v6`.

mod support;

use std::net::Ipv6Addr;

use support::{
    v6::{
        check_icmp6_error, check_packet6, icmp6_error, Ext, Pkt6, NEXT_DEST_OPTS, NEXT_FRAGMENT,
        NEXT_HOP_BY_HOP,
    },
    SYN, UDP, UDP_NOCSUM,
};

const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);

/// The builder and the checker agree, with and without extension headers, and the checker
/// catches a wrong checksum (the packet tables rely on both).
#[test]
fn the_ipv6_test_packets_are_what_they_say() {
    for l4 in [SYN, UDP] {
        for ext in [
            vec![],
            vec![Ext::HopByHop { len8: 0 }, Ext::DestOpts { len8: 1 }],
            vec![Ext::Fragment { offset: 0, more: true, id: 7 }],
        ] {
            let p = Pkt6::new((CLIENT, 40_000), (VIP6, 80), l4).with_ext(&ext);
            let seen = check_packet6(&p.bytes());
            assert_eq!((seen.src, seen.dst), ((CLIENT, 40_000), (VIP6, 80)), "{l4:?} {ext:?}");
            let want: Vec<u8> = ext
                .iter()
                .map(|e| match e {
                    Ext::HopByHop { .. } => NEXT_HOP_BY_HOP,
                    Ext::DestOpts { .. } => NEXT_DEST_OPTS,
                    Ext::Fragment { .. } => NEXT_FRAGMENT,
                    Ext::Routing => 43,
                })
                .collect();
            assert_eq!(seen.ext, want);
            let mut bad = p.bytes();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(std::panic::catch_unwind(|| check_packet6(&bad)).is_err(), "a wrong checksum is caught");
        }
    }
    let z = Pkt6::new((CLIENT, 40_000), (VIP6, 53), UDP_NOCSUM).bytes();
    assert_eq!(check_packet6(&z).udp_checksum, Some(0));
    let quoted = Pkt6::new((VIP6, 80), (CLIENT, 40_000), SYN).bytes();
    let e = icmp6_error(VIP6, CLIENT, 2, 0, 1280, &quoted);
    let seen = check_icmp6_error(&e, true);
    assert_eq!((seen.kind, seen.quoted), (2, ((VIP6, 80), (CLIENT, 40_000))));
}

/// `--ipv6 off` keeps each lb6 map to one entry (their kernel memory); turned on, the maps are
/// made anew at the IPv4 maps' capacities, and kept across restarts at that setting.
#[test]
fn ipv6_off_keeps_the_lb6_maps_to_one_entry_and_on_makes_them_anew() {
    use aya::maps::IterableMap as _;
    use lb_agent::{
        datapath::{Config, Datapath, Mode},
        reconcile::{MapWriter as _, ServiceKey},
    };
    let pins = support::PinDir::new("ipv6-off");
    let size = |m: &aya::maps::MapData| m.info().expect("map info").max_entries();
    let off = Config { ipv6: false, ..support::test_config(pins.path()) };
    {
        let (_dp, maps) = Datapath::load(&off, Mode::Tc).expect("load with IPv6 off");
        let m6 = maps.v6.as_ref().expect("the IPv6 handles");
        assert_eq!((size(m6.ct.map()), size(m6.services.map()), size(m6.members.map())), (1, 1, 1));
        assert_eq!((size(m6.affinity.map()), size(m6.backends.map())), (1, 1));
    }
    let on = support::test_config(pins.path());
    let key = ServiceKey::V6(lb_common::Lb6ServiceKey::new(VIP6.octets(), 80, 6));
    {
        let (_dp, mut maps) = Datapath::load(&on, Mode::Tc).expect("load with IPv6 on");
        let m6 = maps.v6.as_ref().expect("the IPv6 handles");
        assert_eq!((size(m6.ct.map()), size(m6.services.map())), (on.caps.ct, on.caps.services));
        assert_eq!((size(m6.members.map()), size(m6.backends.map())), (on.caps.members, on.caps.backends));
        maps.set_service(&key, &lb_common::Lb4Service { id: 5, ..Default::default() })
            .expect("an IPv6 entry");
    }
    let (_dp, maps) = Datapath::load(&on, Mode::Tc).expect("load again");
    let services = maps.read_services().expect("services");
    assert!(services.iter().any(|(k, s)| *k == key && s.id == 5), "kept across a restart: {services:?}");
}
