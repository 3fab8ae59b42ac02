// DeviceRegistry.swift — every attached device of the loop, entered and removed in one
// place. A device is found by the ring slot its tokens carry (completions), by its
// generation (fences, acknowledgements, duplicate attaches), and through its host's list
// (teardown); the loop also counts stream devices, which make it flush sooner. `enter`,
// `leave` and `release` keep all of them in step.
//
// Loop thread only, as the rest of the loop's state.

struct DeviceRegistry {
    /// By ring slot; a slot is taken again only once its device's last ring operation
    /// completed (`release`), so a late completion never reaches another device.
    private(set) var slots: [AttachedDevice?] = []
    /// Live devices by generation (a closing device is no longer here).
    private(set) var byGeneration: [UInt32: AttachedDevice] = [:]
    /// Live devices on stream channels.
    private(set) var streamDevices = 0
    /// Live devices on shared rings, with their transport as its own class: the loop polls
    /// these on every turn and every spin, where a dynamic call per device showed, and so
    /// did reference counting (`PolledRing`).
    private(set) var polled: [PolledRing] = []
    /// Devices that left `polled` during this turn: kept alive until the next one, so that
    /// a poll in progress over an earlier copy of `polled` never meets a freed device.
    private var departed: [AttachedDevice] = []

    /// The slot the next device gets: the first free one.
    var freeSlot: Int { slots.firstIndex { $0 == nil } ?? slots.count }

    /// Devices holding a slot, live or closing.
    var count: Int { slots.count { $0 != nil } }

    /// Enters `d`, made for `freeSlot`, everywhere it is looked up.
    mutating func enter(_ d: AttachedDevice) {
        let slot = d.token.slot
        precondition(slot == slots.count || slots[slot] == nil, "slot \(slot) is taken")
        if slot == slots.count { slots.append(d) } else { slots[slot] = d }
        byGeneration[d.generation] = d
        if let ring = d.transport as? SharedRingTransport {
            polled.append(PolledRing(device: d, ring: ring))
        } else {
            streamDevices += 1
        }
        d.space.devices.append(d)
    }

    /// `d` is closing: it leaves every lookup but its slot, which its ring operations
    /// still name until they complete.
    mutating func leave(_ d: AttachedDevice) {
        guard byGeneration.removeValue(forKey: d.generation) != nil else { return }
        if d.transport is SharedRingTransport {
            polled.removeAll { $0.device === d }
            departed.append(d)
        } else {
            streamDevices -= 1
        }
        d.space.devices.removeAll { $0 === d }
    }

    /// At the top of a loop turn, when no poll is in progress: devices that left may go.
    mutating func beginTurn() {
        if !departed.isEmpty { departed.removeAll(keepingCapacity: true) }
    }

    /// Frees `d`'s slot once nothing in the ring names it.
    mutating func release(_ d: AttachedDevice) {
        if d.token.slot < slots.count, slots[d.token.slot] === d { slots[d.token.slot] = nil }
    }

    /// The device in `slot` if it is still the one of `generation`.
    func device(slot: Int, generation: UInt32) -> AttachedDevice? {
        guard slot < slots.count, let d = slots[slot], d.generation == generation else { return nil }
        return d
    }
}

/// A device the loop polls, held without reference counting: a spin polls every shared
/// ring a few million times a second, and a retain and a release per ring per poll showed
/// in profiles. The registry keeps each alive while it is in `polled`, and for the rest of
/// the turn it leaves in (`departed`), which covers every poll that can still see it.
struct PolledRing {
    unowned(unsafe) let device: AttachedDevice
    unowned(unsafe) let ring: SharedRingTransport
}
