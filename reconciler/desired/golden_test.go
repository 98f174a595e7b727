package desired

// Golden kernel text, reviewed by hand against docs/dataplane.md.

var goldenAlways = map[string]string{
	"off": `mode off
`,
	"accept": `mode accept
sa in transport 198.18.0.2->198.18.0.1 spi=0x40000200 gen=1 reqid=0x5ec0
sa in transport 198.19.0.3->198.18.0.1 spi=0x40000300 gen=1 reqid=0x5ec0
sa out transport 198.18.0.1->198.18.0.2 spi=0x40000100 gen=1 reqid=0x5ec0
sa out transport 198.18.0.1->198.19.0.3 spi=0x40000100 gen=1 reqid=0x5ec0
policy src=198.18.0.2/32 dst=198.18.0.1/32 proto=4 dir=in priority=24256 tmpl transport src=198.18.0.2 dst=198.18.0.1 spi=0x00000000 reqid=0x5ec0 level=use
policy src=198.19.0.3/32 dst=198.18.0.1/32 proto=4 dir=in priority=24256 tmpl transport src=198.19.0.3 dst=198.18.0.1 spi=0x00000000 reqid=0x5ec0 level=use
`,
	"encrypt": `mode encrypt
sa in transport 198.18.0.2->198.18.0.1 spi=0x40000200 gen=1 reqid=0x5ec0
sa in transport 198.19.0.3->198.18.0.1 spi=0x40000300 gen=1 reqid=0x5ec0
sa out transport 198.18.0.1->198.18.0.2 spi=0x40000100 gen=1 reqid=0x5ec0
sa out transport 198.18.0.1->198.19.0.3 spi=0x40000100 gen=1 reqid=0x5ec0
policy src=198.18.0.2/32 dst=198.18.0.1/32 proto=4 dir=in priority=24256 tmpl transport src=198.18.0.2 dst=198.18.0.1 spi=0x00000000 reqid=0x5ec0 level=use
policy src=198.19.0.3/32 dst=198.18.0.1/32 proto=4 dir=in priority=24256 tmpl transport src=198.19.0.3 dst=198.18.0.1 spi=0x00000000 reqid=0x5ec0 level=use
policy src=198.18.0.1/32 dst=198.18.0.2/32 proto=4 dir=out priority=24256 tmpl transport src=198.18.0.1 dst=198.18.0.2 spi=0x40000100 reqid=0x5ec0 level=required
policy src=198.18.0.1/32 dst=198.19.0.3/32 proto=4 dir=out priority=24256 tmpl transport src=198.18.0.1 dst=198.19.0.3 spi=0x40000100 reqid=0x5ec0 level=required
rule in count 198.18.0.2 (b)
rule out count 198.18.0.2 (b)
rule out count 198.19.0.3 (c)
`,
	"enforce": `mode enforce
sa in transport 198.18.0.2->198.18.0.1 spi=0x40000200 gen=1 reqid=0x5ec0
sa in transport 198.19.0.3->198.18.0.1 spi=0x40000300 gen=1 reqid=0x5ec0
sa out transport 198.18.0.1->198.18.0.2 spi=0x40000100 gen=1 reqid=0x5ec0
sa out transport 198.18.0.1->198.19.0.3 spi=0x40000100 gen=1 reqid=0x5ec0
policy src=198.18.0.2/32 dst=198.18.0.1/32 proto=4 dir=in priority=24256 tmpl transport src=198.18.0.2 dst=198.18.0.1 spi=0x00000000 reqid=0x5ec0 level=required
policy src=198.19.0.3/32 dst=198.18.0.1/32 proto=4 dir=in priority=24256 tmpl transport src=198.19.0.3 dst=198.18.0.1 spi=0x00000000 reqid=0x5ec0 level=use
policy src=198.18.0.1/32 dst=198.18.0.2/32 proto=4 dir=out priority=24256 tmpl transport src=198.18.0.1 dst=198.18.0.2 spi=0x40000100 reqid=0x5ec0 level=required
policy src=198.18.0.1/32 dst=198.19.0.3/32 proto=4 dir=out priority=24256 tmpl transport src=198.18.0.1 dst=198.19.0.3 spi=0x40000100 reqid=0x5ec0 level=required
rule in drop 198.18.0.2 (b)
rule out drop 198.18.0.2 (b)
rule out drop 198.19.0.3 (c)
`,
}

const goldenCrossSubnetEnforce = `mode enforce
sa in transport 198.18.0.2->198.18.0.1 spi=0x40000200 gen=1 reqid=0x5ec0
sa in tunnel 198.18.0.2->198.18.0.1 spi=0x40000201 gen=1 reqid=0x5ec1
sa in transport 198.19.0.3->198.18.0.1 spi=0x40000300 gen=1 reqid=0x5ec0
sa in transport 198.18.0.4->198.18.0.1 spi=0x40000400 gen=1 reqid=0x5ec0
sa in tunnel 198.18.0.4->198.18.0.1 spi=0x40000401 gen=1 reqid=0x5ec1
sa out transport 198.18.0.1->198.18.0.2 spi=0x40000100 gen=1 reqid=0x5ec0
sa out tunnel 198.18.0.1->198.18.0.2 spi=0x40000101 gen=1 reqid=0x5ec1
sa out transport 198.18.0.1->198.18.0.4 spi=0x40000100 gen=1 reqid=0x5ec0
sa out tunnel 198.18.0.1->198.18.0.4 spi=0x40000101 gen=1 reqid=0x5ec1
sa out transport 198.18.0.1->198.19.0.3 spi=0x40000100 gen=1 reqid=0x5ec0
policy src=198.18.0.2/32 dst=198.18.0.1/32 proto=4 dir=in priority=24256 tmpl transport src=198.18.0.2 dst=198.18.0.1 spi=0x00000000 reqid=0x5ec0 level=required
policy src=198.18.0.4/32 dst=198.18.0.1/32 proto=4 dir=in priority=24256 tmpl transport src=198.18.0.4 dst=198.18.0.1 spi=0x00000000 reqid=0x5ec0 level=required
policy src=198.19.0.3/32 dst=198.18.0.1/32 proto=4 dir=in priority=24256 tmpl transport src=198.19.0.3 dst=198.18.0.1 spi=0x00000000 reqid=0x5ec0 level=required
policy src=10.244.1.0/26 dst=10.244.2.0/26 proto=0 dir=out priority=24268 tmpl tunnel src=198.18.0.1 dst=198.18.0.2 spi=0x40000101 reqid=0x5ec1 level=required
policy src=10.244.1.0/26 dst=10.244.2.5/32 proto=0 dir=out priority=24262 bypass
policy src=10.244.1.0/26 dst=10.244.2.9/32 proto=0 dir=out priority=24262 bypass
policy src=10.244.1.0/26 dst=10.244.2.20/32 proto=0 dir=out priority=24262 tmpl tunnel src=198.18.0.1 dst=198.18.0.4 spi=0x40000101 reqid=0x5ec1 level=required
policy src=10.244.1.0/26 dst=10.244.4.0/26 proto=0 dir=out priority=24268 tmpl tunnel src=198.18.0.1 dst=198.18.0.4 spi=0x40000101 reqid=0x5ec1 level=required
policy src=10.244.2.5/32 dst=10.244.2.0/26 proto=0 dir=out priority=24262 tmpl tunnel src=198.18.0.1 dst=198.18.0.2 spi=0x40000101 reqid=0x5ec1 level=required
policy src=10.244.2.5/32 dst=10.244.2.9/32 proto=0 dir=out priority=24256 bypass
policy src=10.244.2.5/32 dst=10.244.2.20/32 proto=0 dir=out priority=24256 tmpl tunnel src=198.18.0.1 dst=198.18.0.4 spi=0x40000101 reqid=0x5ec1 level=required
policy src=10.244.2.5/32 dst=10.244.4.0/26 proto=0 dir=out priority=24262 tmpl tunnel src=198.18.0.1 dst=198.18.0.4 spi=0x40000101 reqid=0x5ec1 level=required
policy src=198.18.0.1/32 dst=198.18.0.2/32 proto=4 dir=out priority=24256 tmpl transport src=198.18.0.1 dst=198.18.0.2 spi=0x40000100 reqid=0x5ec0 level=required
policy src=198.18.0.1/32 dst=198.18.0.4/32 proto=4 dir=out priority=24256 tmpl transport src=198.18.0.1 dst=198.18.0.4 spi=0x40000100 reqid=0x5ec0 level=required
policy src=198.18.0.1/32 dst=198.19.0.3/32 proto=4 dir=out priority=24256 tmpl transport src=198.18.0.1 dst=198.19.0.3 spi=0x40000100 reqid=0x5ec0 level=required
policy src=10.244.2.0/26 dst=10.244.1.0/26 proto=0 dir=fwd priority=24268 tmpl tunnel src=198.18.0.2 dst=198.18.0.1 spi=0x00000000 reqid=0x5ec1 level=required
policy src=10.244.2.0/26 dst=10.244.2.5/32 proto=0 dir=fwd priority=24262 tmpl tunnel src=198.18.0.2 dst=198.18.0.1 spi=0x00000000 reqid=0x5ec1 level=required
policy src=10.244.2.9/32 dst=10.244.1.0/26 proto=0 dir=fwd priority=24262 bypass
policy src=10.244.2.9/32 dst=10.244.2.5/32 proto=0 dir=fwd priority=24256 bypass
policy src=10.244.2.20/32 dst=10.244.1.0/26 proto=0 dir=fwd priority=24262 tmpl tunnel src=198.18.0.4 dst=198.18.0.1 spi=0x00000000 reqid=0x5ec1 level=required
policy src=10.244.2.20/32 dst=10.244.2.5/32 proto=0 dir=fwd priority=24256 tmpl tunnel src=198.18.0.4 dst=198.18.0.1 spi=0x00000000 reqid=0x5ec1 level=required
policy src=10.244.4.0/26 dst=10.244.1.0/26 proto=0 dir=fwd priority=24268 tmpl tunnel src=198.18.0.4 dst=198.18.0.1 spi=0x00000000 reqid=0x5ec1 level=required
policy src=10.244.4.0/26 dst=10.244.2.5/32 proto=0 dir=fwd priority=24262 tmpl tunnel src=198.18.0.4 dst=198.18.0.1 spi=0x00000000 reqid=0x5ec1 level=required
rule in drop 198.18.0.2 (b)
rule in drop 198.18.0.4 (d)
rule in drop 198.19.0.3 (c)
rule out drop 198.18.0.2 (b)
rule out drop 198.18.0.4 (d)
rule out drop 198.19.0.3 (c)
not covered: bgp peer tor (198.18.0.254) is not a cluster node: never encrypted to nor dropped
not covered: pool plain (10.99.0.0/16) ipipMode Never: pod traffic between nodes is not IPIP and is not encrypted
`
